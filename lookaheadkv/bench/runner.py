"""The benchmark: per method and context length, time to first token split into stages and the eviction
overhead against the full cache; decode speed on evicted, full and plain caches at several batch sizes;
KV-cache bytes, peak device memory and the largest batch that fits a memory budget.

Timing rules: device synchronisation around every host clock read (CUDA events for the short, purely device
parts), warm-up runs that are thrown away, medians over repeats. The methods run in a rotating order inside
each repeat, so each method's TTFT is paired with the full cache's TTFT of the same repeat: overhead is the
median over repeats of (TTFT_method - TTFT_full) / TTFT_full. Because TTFT itself varies by ~2% between
repeats at 32K, each eviction stage is also timed directly and summed ("overhead_stages").

Plain transformers ("plain") runs in the same rotation: `model(input_ids, use_cache=True, logits_to_keep=1)`
(generate's own prefill call) with transformers' `sdpa` attention, its DynamicCache and torch's default SDPA
backend choice, so every method's overhead is also reported against it ("overhead_plain", paired like the
above; "overhead_stages_plain", our full cache's median TTFT plus the method's timed work, against plain's).
Fresh lengths (the default): every timed call, warm-up included, runs a prompt of a length no call of the run
has used, a few tokens below the context (a server meets a new length with every prompt, and cuDNN's SDPA
plans anew for each one); the lengths within one repeat differ by a few tokens. Lengths divisible by 16 are
skipped, so the Triton kernels see one specialisation, compiled in the warm-up.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from .. import attention, kernels
from ..cache import kv_bytes
from ..errors import LookaheadKVError
from ..generate import evict
from ..methods import Method, get_method, parse_spec
from ..models import check_device, devices, parse_device_map, tokenizer_identity
from ..prefill import ExtraRows, Prefill, forward, prefill
from . import shapes
from .timing import Clock, median, peak_bytes, reset_peak, sync, time_calls

ROWS_ONLY = "/rows-only"  # label suffix of a single-pass method's twin that runs its extra rows without adapter
PLAIN = "plain"  # label of plain transformers' prefill (transformers' sdpa, torch's backend choice)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class BenchConfig:
    model: str = "tiny"  # a shape (random weights) from shapes.SHAPES, or a named model / path (real weights)
    random_weights: bool = False  # for a named model: its config with random weights
    device: str = "cpu"
    device_map: str | None = None  # accelerate's placement over several devices (models.parse_device_map)
    dtype: str = "float32"
    contexts: list[int] = field(default_factory=lambda: [2048])
    methods: list[str] = field(default_factory=lambda: ["full", "snapkv", "pyramidkv"])  # "name:opt=v:..."
    budget: int = 1024  # entries kept per layer and KV head in the TTFT runs
    decode_context: int | None = None  # default: the largest context
    decode_budgets: list[int] = field(default_factory=lambda: [256, 1024])
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 16])
    decode_methods: list[str] = field(default_factory=lambda: ["snapkv", "pyramidkv", "lookahead"])
    decode_steps: int = 16
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 512  # answer length assumed when sizing the largest batch
    memory_gib: float | None = None  # memory to fit batches into (default: the device's, or 80 GiB on a CPU)
    draft_model: str = "llama-3.2-1b"  # SpecKV's draft: a shape (random weights, the target's vocabulary) or name
    lookahead_n: int = 32  # rows of the random lookahead module built when the model has none
    # Methods whose rows ride in the prefill (single-pass lookahead) also run as "<spec>/rows-only": the same
    # extra rows without their adapter, so the paired difference shows what the adapter itself costs.
    split_extra_rows: bool = True
    plain: bool = True  # also time plain transformers' prefill in the rotation ("plain")
    fresh_lengths: bool = True  # every TTFT call at a prompt length new to the run (False: all at the context)
    seed: int = 0


def storage_bytes(cache) -> int:
    """Bytes of the distinct storages behind the cache tensors (what the cache really holds on to)."""
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class Bench:
    def __init__(self, cfg: BenchConfig, built: tuple | None = None):
        """`built`: (model, note) of an earlier Bench of the same cfg.model, dtype and device, to reuse (one GPU
        process timing several configurations builds each model once)."""
        self.cfg = cfg
        if cfg.dtype not in DTYPES:
            raise LookaheadKVError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[cfg.dtype]
        clock = Clock("cpu")
        placement = None if cfg.device_map is None else parse_device_map(cfg.device_map)
        if placement is None:
            check_device(cfg.device)
        self.model, self.note = built or shapes.build(cfg.model, cfg.device, self.dtype, cfg.random_weights,
                                             device_map=placement)
        # inputs go to the first layer's device; clocks and memory cover every device the model spreads over
        self.device = next(self.model.parameters()).device
        self.devices = devices(self.model)
        self.notes: list[str] = [self.note]
        self.methods = {spec: self._method(spec) for spec in cfg.methods}
        if "full" not in self.methods:
            self.methods = {"full": get_method("full"), **self.methods}
        for spec, m in list(self.methods.items()):
            if cfg.split_extra_rows and m.evicts and m.prefill_extra(self.model) is not None:
                self.methods[spec + ROWS_ONLY] = _rows_only(self.model, m)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.seconds = {"build": clock.lap()}  # wall time of each phase, to plan runs on a rationed device

    # ------------------------------------------------------------------------------------------ setup

    def _method(self, spec: str) -> Method:
        name, options = parse_spec(spec)
        if name == "speckv" and isinstance(options.get("draft_model", self.cfg.draft_model), str):
            draft = options.get("draft_model", self.cfg.draft_model)
            dm, note = shapes.build(draft, str(self.device), self.dtype, self.cfg.random_weights,
                                    vocab_size=self.model.config.vocab_size)
            if note == shapes.RANDOM_NOTE:  # random weights over the target's vocabulary: it reads the target's ids
                dm.tokenizer_sha256 = tokenizer_identity(self.model)
            self.notes.append(f"speckv draft model {draft}: {note}")
            options["draft_model"] = dm
        if name == "lookahead" and "module" not in options:
            self._lookahead_module()
        return get_method(name, **options)

    def _lookahead_module(self) -> None:
        from .. import lookahead

        if getattr(self.model, "_lookahead_module", None) is not None:
            return
        if self.note == shapes.RANDOM_NOTE:
            lookahead.create(self.model, n=self.cfg.lookahead_n)
            self.notes.append(f"lookahead: a randomly initialised module (n={self.cfg.lookahead_n}; it times exactly "
                              "like a trained one)")
            return
        try:
            lookahead.use_module(self.model)
            self.notes.append("lookahead: the shipped module")
        except LookaheadKVError:
            lookahead.create(self.model, n=self.cfg.lookahead_n)
            self.notes.append(f"lookahead: no module shipped for this model; a randomly initialised one "
                              f"(n={self.cfg.lookahead_n}) times exactly like a trained one")

    def _ids(self, batch: int, length: int) -> torch.Tensor:
        vocab = self.model.config.vocab_size
        return torch.randint(0, vocab, (batch, length), generator=self.gen).to(self.device)

    # ------------------------------------------------------------------------------------------ TTFT

    def _plain_once(self, ids: torch.Tensor) -> dict:
        """One prefill by plain transformers: the model's forward as generate's prefill calls it, with
        transformers' own sdpa attention and cache and torch's default SDPA backend choice."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak(self.devices)
        with plain_attention(self.model), torch.no_grad():
            clock = Clock(self.devices)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            t = clock.lap()
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed after transformers 5.17
        full = kv_bytes(cache)
        return {"ttft": t, "stages": {"prefill": t}, "kv_bytes_full": full, "kv_bytes_kept": full,
                "storage_bytes": storage_bytes(cache), "kept_tokens": float(ids.shape[1]),
                "peak_bytes": peak_bytes(self.devices)}

    def _lengths(self, length: int, calls: int) -> list[int]:
        """Prompt lengths for `calls` TTFT calls at `length`: all `length`, or fresh ones (see the module)."""
        if not self.cfg.fresh_lengths:
            return [length] * calls
        out = [n for n in range(length - 1, 0, -1) if n % 16][:calls]
        if len(out) < calls or out[-1] <= self.cfg.budget:
            raise LookaheadKVError(f"context {length} is too short for {calls} fresh prompt lengths above the budget "
                                   f"{self.cfg.budget}; lower --repeats, or pass --repeat-lengths")
        return out

    def _ttft_once(self, m: Method, ids: torch.Tensor) -> dict:
        """One time-to-first-token run: prefill, then (evicting methods) glimpse, score, select, compact."""
        glimpse_s = []
        if m.evicts:
            inner = type(m).glimpse.__get__(m)

            def glimpse(model, pf):  # timed on its own (the instance attribute shadows the method)
                c = Clock(self.devices)
                out = inner(model, pf)
                glimpse_s.append(c.lap())
                return out

            m.glimpse = glimpse
        if self.device.type == "cuda":  # every run starts from the same allocator state (no blocks cached by
            torch.cuda.empty_cache()  # the run before, which made runs after the drafting methods slower)
        reset_peak(self.devices)
        clock = Clock(self.devices)
        try:
            pf = prefill(self.model, ids, record_rows=m.recorded() if m.evicts else 0,
                         extra=m.prefill_extra(self.model) if m.evicts else None)
            t_prefill = clock.lap()
            full_bytes = kv_bytes(pf.cache)
            stages = {"prefill": t_prefill}
            kept = full_bytes
            if m.evicts:
                ev = evict(self.model, pf, m, self.cfg.budget)
                t_evict = clock.lap()
                own = {k: v for k, v in ev.parts.items() if k not in ("score", "select", "compact")}
                g = sum(glimpse_s)
                stages["glimpse"] = max(0.0, g - sum(own.values()))  # the glimpse apart from its named parts
                stages.update(own)
                stages["score"] = ev.parts.get("score", 0.0) + sum(own.values()) - g
                stages["select"] = ev.parts.get("select", 0.0)
                stages["compact"] = ev.parts.get("compact", 0.0)
                stages["other"] = t_evict - sum(ev.parts.values())  # bookkeeping outside the named parts
                kept = kv_bytes(pf.cache)
                ttft = t_prefill + t_evict
            else:
                ttft = t_prefill
            return {"ttft": ttft, "stages": stages, "kv_bytes_full": full_bytes, "kv_bytes_kept": kept,
                    "storage_bytes": storage_bytes(pf.cache), "kept_tokens": sum(_lengths(pf)) / len(_lengths(pf)),
                    "peak_bytes": peak_bytes(self.devices)}
        finally:
            if m.evicts:
                del m.glimpse

    def _record_direct(self, m: Method, length: int) -> dict[str, float]:
        """Seconds the in-prefill recording of this method's rows costs over all layers, timed directly on
        query and key tensors of the model's shapes (the recording is otherwise hidden inside the prefill):
        {"used": the path the prefill takes, and, where that is the fused kernel, "pytorch": the other path}."""
        counts = m.recorded() if m.evicts else []
        extra = m.prefill_extra(self.model) if m.evicts else None
        if extra is not None:
            counts = [extra.embeds.shape[1]]
        if not counts:
            return {"used": 0.0}
        counts = [length if r < 0 else r for r in counts]
        rows = max(counts)
        cfg = self.model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q = torch.randn(1, cfg.num_attention_heads, rows, d, device=self.device, dtype=self.dtype)
        k = torch.randn(1, cfg.num_key_value_heads, length + (rows if extra is not None else 0), d,
                        device=self.device, dtype=self.dtype)
        layer = SimpleNamespace(layer_idx=0)
        lse = None
        if attention.lse_applies(q.shape[1], k.shape[1], d, self.dtype, self.device):
            # the prefill's own attention call gives the rows' log-sum-exp: the recording is one pass over the keys
            logits = (q.float().view(1, k.shape[1], -1, d) @ k.float().transpose(-1, -2)).view(1, q.shape[1], rows, -1)
            hidden = torch.arange(k.shape[2], device=self.device) > torch.arange(
                k.shape[2] - rows, k.shape[2], device=self.device)[:, None]
            lse = (logits * d**-0.5).masked_fill(hidden, float("-inf")).logsumexp(-1)
            del logits

        def all_layers(lse=lse):
            recs = [attention.Recording(rows=r, columns=length if extra is not None else None) for r in counts]
            for _ in range(cfg.num_hidden_layers):
                for rec in recs:
                    attention._record(rec, layer, q, k, d**-0.5, None, lse=lse)

        out = {"used": median(time_calls(all_layers, self.devices, self.cfg.repeats, warmup=1))}
        if lse is not None:  # the two passes it replaces, for comparison
            out["two_pass"] = median(time_calls(lambda: all_layers(None), self.devices, self.cfg.repeats, warmup=1))
        if kernels.pays(q):
            with kernels.disabled():
                out["pytorch"] = median(time_calls(all_layers, self.devices, self.cfg.repeats, warmup=1))
        return out

    def _adapter_direct(self, m: Method, length: int) -> float:
        """Seconds the adapter of a single-pass method's extra rows adds to its prefill of `length` prompt rows
        + n rows, timed directly: its hooks' work on every LoRA-wrapped projection of every layer (the LoRA
        deltas on the last n rows, added to the base outputs), run back to back in one timed call on inputs of
        the prefill's shapes (one input and base outputs per kind of group, shared by the layers alike in shape).
        Timing the hooks alone, not a prefill with and without them, keeps the large base products (and their
        noise) out; alone, nothing hides their launches behind those products, so this is an upper bound (the
        rows-only twin's paired prefill gives what they cost inside one)."""
        extra = m.prefill_extra(self.model)
        if extra is None:
            return 0.0
        from .. import lookahead

        rows = lookahead.RowsLoRA.of(self.model, length)
        kinds: dict[tuple, list] = {}  # groups of siblings alike in shape (one per decoder layer)
        for members in lookahead.lora_groups(self.model):
            shape = tuple((m.get_base_layer().in_features, m.get_base_layer().out_features) for m in members)
            kinds.setdefault(shape, []).append(members)
        n = extra.embeds.shape[1]
        tensors = {}
        with torch.no_grad():
            for shape in kinds:  # made on the device
                x = torch.randn(1, length + n, shape[0][0], device=self.device, dtype=self.dtype)
                tensors[shape] = (x, [torch.randn(1, length + n, out, device=self.device, dtype=self.dtype)
                                      for _, out in shape])

            def call():
                rows.inputs = {}
                for shape, groups in kinds.items():
                    x, ys = tensors[shape]
                    for members in groups:
                        for layer, y in zip(members, ys):
                            rows.hook(layer, (x,), y)

            return median(time_calls(call, self.devices, self.cfg.repeats, warmup=1))

    def labels(self) -> list[str]:
        """What the TTFT runs time: every method, and plain transformers."""
        return list(self.methods) + ([PLAIN] if self.cfg.plain else [])

    def ttft(self, bar: tqdm) -> list[dict]:
        out = []
        labels = self.labels()
        for length in self.cfg.contexts:
            ids = self._ids(1, length)
            lengths = iter(self._lengths(length, (self.cfg.warmup + self.cfg.repeats) * len(labels)))
            runs: dict[str, list[dict]] = {label: [] for label in labels}
            for r in range(self.cfg.warmup + self.cfg.repeats):
                order = labels[r % len(labels):] + labels[: r % len(labels)]
                for label in order:
                    bar.set_postfix_str(f"TTFT {label} @ {length}")
                    n = next(lengths)
                    run = self._plain_once(ids[:, :n]) if label == PLAIN else self._ttft_once(self.methods[label],
                                                                                              ids[:, :n])
                    run["length"] = n
                    if r >= self.cfg.warmup:
                        runs[label].append(run)
                    bar.update()
            full, plain = runs["full"], runs.get(PLAIN)
            ttft_plain = median([p["ttft"] for p in plain]) if plain else None
            for label in labels:
                rs = runs[label]
                if label == PLAIN:
                    out.append(_plain_row(length, rs, full))
                    continue
                overhead = [(a["ttft"] - f["ttft"]) / f["ttft"] for a, f in zip(rs, full)]
                stages = {k: median([x["stages"].get(k, 0.0) for x in rs]) for k in rs[0]["stages"]}
                m = self.methods[label]
                paths = self._record_direct(m, length)
                record = paths["used"]
                extra = m.evicts and m.prefill_extra(self.model) is not None
                prefill_delta = median([a["stages"]["prefill"] - f["stages"]["prefill"] for a, f in zip(rs, full)])
                after = sum(v for k, v in stages.items() if k != "prefill")
                ttft_full = median([f["ttft"] for f in full])
                # The rows-only twin runs its rows without the adapter: nothing of the adapter to charge it.
                adapter = self._adapter_direct(m, length) if extra and not label.endswith(ROWS_ONLY) else 0.0
                # Extra rows in the prefill: recording + adapter (timed directly) + the rows' share of the
                # prefill's work (n / L of it, an estimate: the rows add n to every matrix product's L).
                rows_share = m.prefill_extra(self.model).embeds.shape[1] / length * median(
                    [f["stages"]["prefill"] for f in full]) if extra else 0.0
                in_prefill = record + adapter + rows_share
                stages_overhead = (in_prefill + after) / ttft_full if m.evicts else 0.0
                vs_plain = {}
                if plain:  # against plain transformers: paired, and our full TTFT + this method's timed work
                    paired = [(a["ttft"] - p["ttft"]) / p["ttft"] for a, p in zip(rs, plain)]
                    vs_plain = {"ttft_plain_s": ttft_plain, "overhead_plain": median(paired),
                                "overhead_stages_plain": (ttft_full * (1 + stages_overhead) - ttft_plain) / ttft_plain}
                out.append({
                    "context": length, "method": label, "budget": self.cfg.budget if m.evicts else length,
                    "ttft_s": median([x["ttft"] for x in rs]), "ttft_full_s": ttft_full,
                    "overhead": median(overhead) if m.evicts else 0.0,
                    "overhead_stages": stages_overhead, **vs_plain, "lengths": [x["length"] for x in rs],
                    "stages_s": {**stages, "prefill_delta": prefill_delta, "record": record,
                                 **({"adapter": adapter, "extra_rows_share": rows_share} if extra else {})},
                    "kv_bytes_full": rs[0]["kv_bytes_full"], "kv_bytes_kept": rs[0]["kv_bytes_kept"],
                    "bytes_length": rs[0]["length"],  # the prompt length the byte figures are of
                    "storage_bytes": rs[0]["storage_bytes"], "kept_tokens": rs[0]["kept_tokens"],
                    "peak_bytes": max((x["peak_bytes"] or 0) for x in rs) or None,
                    "ttft_runs_s": [x["ttft"] for x in rs], "overhead_runs": overhead,
                    **({"record_pytorch_s": paths["pytorch"]} if "pytorch" in paths else {}),
                    **({"record_two_pass_s": paths["two_pass"]} if "two_pass" in paths else {}),
                })
                twin = runs.get(label + ROWS_ONLY)
                if extra and twin:  # what the adapter adds inside the prefill: paired against the same rows without it
                    out[-1]["adapter_paired_s"] = median([a["stages"]["prefill"] - t["stages"]["prefill"]
                                                          for a, t in zip(rs, twin)])
            del ids
        return out

    # ------------------------------------------------------------------------------------------ decode

    def _caches(self, length: int) -> dict[str, tuple[Prefill, int]]:
        """label -> (prefill with the cache to decode from, position of the next token)."""
        ids = self._ids(1, length)
        out = {"full": (prefill(self.model, ids), length)}
        for spec in self.cfg.decode_methods:
            if spec not in self.methods or not self.methods[spec].evicts:
                continue
            m = self.methods[spec]
            base = prefill(self.model, ids, record_rows=m.recorded(), extra=m.prefill_extra(self.model))
            for b in self.cfg.decode_budgets:
                if b >= length:
                    continue
                pf = base.clone()
                evict(self.model, pf, m, b)
                out[f"{spec}@{b}"] = (pf, length)
            del base
        for b in self.cfg.decode_budgets:
            if b < length:
                out[f"plain@{b}"] = (prefill(self.model, self._ids(1, b)), b)
        return out

    def _decode_steps(self, pf: Prefill, position: int, batch: int) -> dict:
        cache = copy.deepcopy(pf.cache)
        if batch > 1:
            for layer in cache.layers:
                layer.batch_repeat_interleave(batch)  # transformers' own (our layers repeat their positions too)
        held = kv_bytes(cache)
        tokens = self._ids(batch, self.cfg.decode_steps + 2)
        reset_peak(self.devices)
        step = {"i": 0}

        def one():
            i = step["i"]
            pos = torch.full((batch, 1), position + i, device=self.device)
            forward(self.model, cache, pos, input_ids=tokens[:, i: i + 1])
            step["i"] += 1

        with torch.no_grad():
            times = time_calls(one, self.devices, self.cfg.decode_steps, warmup=2)
        peak = peak_bytes(self.devices)
        s = median(times)
        return {"step_s": s, "tokens_per_s": batch / s, "kv_bytes": held, "peak_bytes": peak, "steps_s": times}

    def decode(self, bar: tqdm) -> list[dict]:
        """Decode steps on every cache at every batch. A batch-1 step is host-bound and the host's speed drifts
        over seconds, so each cache's steps run in `repeats` blocks, the caches in a rotating order within each
        round: every cache meets the same slow and fast stretches (one block per cache had an evicted cache
        20% slower than a plain one of the same size that launches exactly the same operations)."""
        length = self.cfg.decode_context or max(self.cfg.contexts)
        bar.set_postfix_str(f"decode caches @ {length}")
        caches = self._caches(length)
        labels = list(caches)
        out = []
        for batch in self.cfg.decode_batches:
            blocks: dict[str, list[dict]] = {label: [] for label in labels}
            for r in range(max(1, self.cfg.repeats)):
                for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                    bar.set_postfix_str(f"decode {label} batch {batch}")
                    pf, position = caches[label]
                    blocks[label].append(self._decode_steps(pf, position, batch))
            for label in labels:
                pf = caches[label][0]
                lengths = _lengths(pf)
                times = [t for b in blocks[label] for t in b["steps_s"]]
                s = median(times)
                peaks = [b["peak_bytes"] for b in blocks[label] if b["peak_bytes"] is not None]
                out.append({"context": length, "batch": batch, "cache": label,
                            "kept_tokens": sum(lengths) / len(lengths), "step_s": s, "tokens_per_s": batch / s,
                            "kv_bytes": blocks[label][0]["kv_bytes"], "peak_bytes": max(peaks) if peaks else None,
                            "steps_s": times})
                bar.update()
        del caches
        return out

    # ------------------------------------------------------------------------------------------ capacity

    def capacity(self, ttft: list[dict], decode: list[dict]) -> dict:
        """Largest batch that fits: (memory - weights - workspace) // bytes one sequence's cache needs at the
        end of a `new_tokens` answer, from the measured KV bytes per token (full) or kept bytes (evicted)."""
        if self.cfg.memory_gib is not None:
            memory, source = int(self.cfg.memory_gib * 2**30), "given"
        elif self.device.type == "cuda":
            memory = sum(torch.cuda.get_device_properties(d).total_memory for d in self.devices)
            source = "device total" if len(self.devices) == 1 else f"total of {len(self.devices)} devices"
        else:
            memory, source = 80 * 2**30, "a hypothetical 80 GiB accelerator"
        weights = shapes.weight_bytes(self.model)
        if not decode:
            return {}
        length = decode[0]["context"]
        full_b1 = next(d for d in decode if d["cache"] == "full" and d["batch"] == decode[0]["batch"])
        per_token = full_b1["kv_bytes"] / (full_b1["batch"] * length)
        workspace = 0
        if full_b1["peak_bytes"] is not None:
            workspace = max(0, full_b1["peak_bytes"] - weights - full_b1["kv_bytes"])
        free = memory - weights - workspace
        new = self.cfg.new_tokens
        rows = {}
        for d in decode:
            if d["batch"] != full_b1["batch"]:
                continue
            per_seq = d["kv_bytes"] / d["batch"] + per_token * new
            rows[d["cache"]] = {"bytes_per_sequence": per_seq, "max_batch": max(0, math.floor(free / per_seq))}
        return {"memory_bytes": memory, "memory_source": source, "weights_bytes": weights,
                "workspace_bytes": workspace, "context": length, "new_tokens": new,
                "kv_bytes_per_token": per_token, "caches": rows}

    # ------------------------------------------------------------------------------------------ all

    def run(self, checkpoint: Path | None = None) -> dict:
        """Every measurement; with `checkpoint`, the TTFT results are written there before decoding starts
        (a run cut short still leaves them)."""
        n_ttft = len(self.cfg.contexts) * (self.cfg.warmup + self.cfg.repeats) * len(self.labels())
        n_caches = 1 + len(self.cfg.decode_budgets) * (1 + sum(s in self.methods for s in self.cfg.decode_methods))
        total = n_ttft + len(self.cfg.decode_batches) * n_caches
        clock = Clock("cpu")
        with tqdm(total=total, desc="bench", unit="run") as bar:
            ttft = self.ttft(bar)
            self.seconds["ttft"] = clock.lap()
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                checkpoint.write_text(json.dumps({"meta": self.meta(), "ttft": ttft, "decode": [], "capacity": {},
                                                  "partial": "decode runs not finished"}, indent=1) + "\n")
            decode = self.decode(bar) if self.cfg.decode_batches else []
            self.seconds["decode"] = clock.lap()
        return {"meta": self.meta(), "ttft": ttft, "decode": decode, "capacity": self.capacity(ttft, decode)}

    def meta(self) -> dict:
        import transformers

        c = self.model.config
        return {
            "model": self.cfg.model, "weights": self.note, "notes": self.notes, "config": asdict(self.cfg),
            "shape": {k: getattr(c, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                                       "vocab_size")},
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()
            or "cpu", "devices": [str(d) for d in self.devices], "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "weights_bytes": shapes.weight_bytes(self.model), "seconds": self.seconds,
            "row_attention": "fused Triton kernel (<= 64 rows)" if kernels.pays(
                torch.empty(1, 1, 1, 1, dtype=self.dtype, device=self.device)) else "PyTorch",
        }


@contextlib.contextmanager
def plain_attention(model):
    """The model as plain transformers runs it inside the block: its own sdpa attention, and the base layers
    in place of the lookahead LoRA's PEFT wrappers (switched off, but each a Python call on every forward);
    ours again after it."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in wrapped:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base_layer)
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        attention.install(model)
        for name, m in wrapped:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, m)


def _plain_row(length: int, rs: list[dict], full: list[dict]) -> dict:
    """The TTFT row of plain transformers: its overhead against our full cache (paired), 0 against itself."""
    ttft = median([x["ttft"] for x in rs])
    return {"context": length, "method": PLAIN, "budget": length, "ttft_s": ttft,
            "ttft_full_s": median([f["ttft"] for f in full]),
            "overhead": median([(p["ttft"] - f["ttft"]) / f["ttft"] for p, f in zip(rs, full)]),
            "overhead_stages": 0.0, "ttft_plain_s": ttft, "overhead_plain": 0.0, "overhead_stages_plain": 0.0,
            "lengths": [x["length"] for x in rs], "stages_s": {"prefill": median([x["ttft"] for x in rs])},
            "kv_bytes_full": rs[0]["kv_bytes_full"], "kv_bytes_kept": rs[0]["kv_bytes_kept"],
            "bytes_length": rs[0]["length"], "storage_bytes": rs[0]["storage_bytes"],
            "kept_tokens": rs[0]["kept_tokens"],
            "peak_bytes": max((x["peak_bytes"] or 0) for x in rs) or None,
            "ttft_runs_s": [x["ttft"] for x in rs], "overhead_runs": [], "plain": True}


def _rows_only(model, m: Method) -> Method:
    """A copy of m whose extra prefill rows run without the context that switches their adapter on."""

    twin = copy.copy(m)
    extra = m.prefill_extra(model)
    twin.prefill_extra = lambda model: ExtraRows(extra.embeds, lambda first: contextlib.nullcontext())
    return twin


def _lengths(pf: Prefill) -> list[int]:
    return [layer.keys.shape[-2] for layer in pf.cache.layers]


def run_bench(cfg: BenchConfig, out: str | Path | None = None, plots: bool = True) -> dict:
    """Run the benchmark; with `out`, write bench.json (+ the PNG plots and a markdown table) there."""
    from .report import check_targets, markdown

    result = Bench(cfg).run(Path(out) / "bench.json" if out is not None else None)
    result["targets"] = check_targets(result)
    sync(cfg.device)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "bench.md").write_text(markdown(result) + "\n")
        if plots:
            from .plots import plot_all

            plot_all(result, out)
    return result
