"""The evaluation runner: every method x budget on every sample, from ONE prefill per batch of samples.

For a batch of samples of one task: prefill once (left-padded, recording every row count the methods need);
score each method once on a copy of that prefill (scores do not depend on the budget); evict a copy per
budget; then decode every copy together. Copies whose per-layer cache lengths are close are stacked along
the batch dimension (left-padded per layer, with per-layer key-validity masks, so padding changes nothing),
so one decode loop serves many methods x budgets. The full cache is the reference: its answer gives the
fidelity of every other answer (token F1 against it) and its attention the true importance for the
importance recall at each budget.

Query-aware (default): the question is inside the prompt that is compressed. Query-agnostic: the context is
prefilled and compressed alone; the question (and the assistant's answer prefix) is then run on the
evicted cache, and the answer decoded after it.

Rows go to a JSONL file as each batch finishes (flushed); a rerun skips every row already there (key: model,
task, length, sample, mode, method label, budget), so an interrupted run resumes and a finished one does
nothing. Under torchrun the batches are shared out over the processes, each writing a part file that rank 0
merges at the end (shards.py): the file then holds the rows one process writes, in its order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cache as kvcache
from .. import distributed
from ..attention import Recording, forward_state
from ..bench.timing import Clock
from ..cache import crop
from ..decode import Sampling, decode
from ..errors import LookaheadKVError
from ..generate import evict
from ..importance import recall_per_sequence, true_importance
from ..methods import Method
from ..models import devices
from ..prefill import Prefill, forward, prefill
from . import metrics, shards
from .tasks import Sample, make_sample, resolve_tasks

ROW_KEY = ("model", "task", "length", "sample", "mode", "method", "budget")
def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results file (gzip when the name ends in .gz); a line cut off by an interrupted run, or any
    line that is not a JSON object, is skipped."""
    import gzip

    p = Path(path)
    if not p.exists():
        return []
    try:
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError) as e:
        raise LookaheadKVError(f"{p} is not a readable gzip file ({e})") from None
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def check_out(path: str | Path | None) -> None:
    """Rows are appended to --out as they finish, as plain JSONL; appending plain lines to a gzip file would
    leave it unreadable."""
    if path is not None and Path(path).suffix == ".gz":
        raise LookaheadKVError(f"--out {path}: rows are appended to a plain JSONL file as they finish; give a name "
                               "ending in .jsonl (gzip it when the run is done: report reads .jsonl.gz)")


class Sink:
    """Appends rows to a JSONL file, one flushed line each; a cut-off last line is closed first."""

    def __init__(self, path: str | Path | None):
        self.f = None
        check_out(path)
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            torn = p.exists() and p.stat().st_size > 0 and not p.read_bytes().endswith(b"\n")
            self.f = open(p, "a", encoding="utf-8")
            if torn:
                self.f.write("\n")

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


# ------------------------------------------------------------------------------------------------- prompts

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer, s: Sample) -> tuple[str, str]:
    """The prompt as (everything up to the end of the context, the rest: query, chat turn, answer prefix)."""
    user = s.context + s.query
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = user + "\n"
    text += s.answer_prefix
    cut = text.index(user) + len(s.context)
    return text[:cut], text[cut:]


def encode_sample(tokenizer, s: Sample) -> tuple[list[int], list[int]]:
    head, tail = render(tokenizer, s)
    return _encode(tokenizer, head), _encode(tokenizer, tail)


def score_answer(metric: str, references: Sequence[str], answer: str, full_answer: str) -> dict[str, float]:
    """The task's score of `answer` (and exact match for QA), and its fidelity to the full cache's answer."""
    out = {"fidelity": metrics.token_f1(answer, full_answer)}
    if metric == "all":
        return {"score": metrics.string_match_all(answer, references), **out}
    if metric == "part":
        return {"score": metrics.string_match_part(answer, references), **out}
    if metric == "f1":
        return {"score": metrics.token_f1(answer, references), "em": metrics.exact_match(answer, references), **out}
    if metric == "rouge":
        return {"score": metrics.rouge_l(answer, full_answer), **out}
    raise ValueError(metric)


def rescore(rows: Sequence[dict]) -> list[dict]:
    """The rows with score, em and fidelity computed again from their stored answers by today's metrics (after
    a metric is corrected; nothing is re-run). The references and the full cache's answer come from each
    sample's full-cache row."""
    from .tasks import TASKS, task_groups

    task_groups()  # registers every task
    sample = ("model", "task", "length", "sample", "mode")
    full = {tuple(r[k] for k in sample): r for r in rows if r["method"] == "full"}
    out = []
    for r in rows:
        f = full.get(tuple(r[k] for k in sample))
        if f is None:
            raise LookaheadKVError(f"row of {r['method']} on {r['sample']} has no full-cache row to score against")
        out.append({**r, **score_answer(TASKS[r["task"]].metric, f["answers"], r["answer"], f["answer"])})
    return out


# --------------------------------------------------------------------------------------------- batch of copies

@dataclass
class Copy:
    """One method x budget applied to a copy of the batch's prefill."""

    method: str
    budget: int | None  # requested; None for the full cache
    pf: Prefill
    kept: list[torch.Tensor | None]
    key_valid: list[torch.Tensor] | None
    effective: int  # the budget evict() applied (min(budget, prompt length))
    seconds: float

    def lengths(self) -> list[int]:
        return [layer.keys.shape[-2] for layer in self.pf.cache.layers]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s))
            valid[i, width - len(s):] = True
    return ids.to(device), valid.to(device)


def _group(c: Copy) -> int:
    """Decode group: copies whose longest layer falls in the same power of 4 stack together (padding each
    layer to the group's longest costs at most 4x the memory of the copy, and saves a decode loop)."""
    return math.ceil(math.log2(max(2, max(c.lengths()))) / 2)


def merge(model, copies: Sequence[Copy]):
    """Stack copies along the batch: per layer, each copy is left-padded to the longest; returns (cache,
    per-layer key validity, prompt validity rows, first-token logits rows)."""
    from transformers import DynamicCache

    valid = torch.cat([c.pf.valid for c in copies])
    logits = torch.cat([c.pf.next_logits for c in copies])
    if all(isinstance(c.pf.cache, kvcache.EvictableCache) for c in copies):  # positions and windows travel along
        cache = kvcache.stack([c.pf.cache for c in copies])
        return cache, kvcache.key_valid(cache), valid, logits
    cache = DynamicCache(config=model.config)
    key_valid = []
    for li in range(model.config.num_hidden_layers):
        width = max(c.pf.cache.layers[li].keys.shape[-2] for c in copies)
        ks, vs, ms = [], [], []
        for c in copies:
            layer = c.pf.cache.layers[li]
            pad = width - layer.keys.shape[-2]
            valid = (c.key_valid[li].to(layer.keys.device) if c.key_valid is not None
                     else torch.ones(layer.keys.shape[0], layer.keys.shape[-2], dtype=torch.bool,
                                     device=layer.keys.device))
            ks.append(F.pad(layer.keys, (0, 0, pad, 0)))
            vs.append(F.pad(layer.values, (0, 0, pad, 0)))
            ms.append(F.pad(valid, (pad, 0), value=False))
        cache.update(torch.cat(ks), torch.cat(vs), li)
        key_valid.append(torch.cat(ms))
    return cache, key_valid, valid, logits


def decode_copies(model, copies: Sequence[Copy], suffix: tuple[torch.Tensor, torch.Tensor] | None,
                  eos: set[int], max_new: int) -> list[list[list[int]]]:
    """Answers [copy][sample] -> tokens, decoding stacked copies of similar cache lengths together (see _group)."""
    out: list[list[list[int]] | None] = [None] * len(copies)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(copies):
        groups.setdefault(_group(c), []).append(i)
    for members in groups.values():
        group = [copies[i] for i in members]
        cache, key_valid, valid, logits = merge(model, group)
        ids = torch.cat([c.pf.input_ids for c in group])
        if suffix is not None:  # query-agnostic: the question runs on the evicted cache
            s_ids, s_valid = (t.repeat(len(group), 1) for t in suffix)
            positions = valid.sum(dim=1, keepdim=True) + (s_valid.long().cumsum(dim=1) - 1).clamp(min=0)
            key_valid = [torch.cat([kv, s_valid], dim=1) for kv in key_valid]
            with forward_state(key_valid=key_valid):
                logits = forward(model, cache, positions, input_ids=s_ids, valid=s_valid)[:, -1].float()
            valid = torch.cat([valid, s_valid], dim=1)
            ids = torch.cat([ids, s_ids], dim=1)
        shim = Prefill(cache, ids, valid, logits, {})
        tokens = decode(model, shim, key_valid, eos, Sampling(max_new))
        n = group[0].pf.valid.shape[0]
        for j, i in enumerate(members):
            out[i] = tokens[j * n:(j + 1) * n]
        del cache, shim
    return out  # type: ignore[return-value]


def slice_prefill(pf: Prefill, i: int) -> Prefill:
    """Sequence i of a batched prefill, sharing its tensors (cache layers are shallow copies, so appending
    to and cropping the slice never touches the batch)."""
    cache = copy.copy(pf.cache)
    cache.layers = [copy.copy(layer) for layer in pf.cache.layers]
    for layer in cache.layers:
        layer.batch_select_indices(slice(i, i + 1))  # transformers' own batch selection (our layers: positions too)
    return Prefill(cache, pf.input_ids[i:i + 1], pf.valid[i:i + 1], pf.next_logits[i:i + 1], {})


def answer_importance(model, pf: Prefill, after: list[int], n_answer: int) -> list[torch.Tensor]:
    """Per layer [1, Hq, L]: mean attention onto the prompt of the last n_answer of the rows `after` run
    after it (query-agnostic: the question, then the answer)."""
    rec = Recording(rows=n_answer, columns=pf.length)
    ids = torch.tensor([after], device=pf.valid.device)
    positions = pf.lengths[:, None] + torch.arange(len(after), device=pf.valid.device)
    with torch.no_grad(), forward_state(rec, pf.key_valid(model.config.num_hidden_layers)):
        forward(model, pf.cache, positions, input_ids=ids)
    crop(pf.cache, pf.length)
    return rec.mean()


@dataclass
class Evaluator:
    model: object
    tokenizer: object
    model_name: str
    methods: dict[str, Method]
    budgets: list[int]
    query_agnostic: bool = False
    note: object = print

    def __post_init__(self):
        self.device = next(self.model.parameters()).device
        cfg = self.model.config
        self.n_layers, self.n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {self.tokenizer.eos_token_id}
        self.eos = ids - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos) if self.eos else 0
        self.dropped: set[str] = set()
        self.skipped: set[tuple[str, int]] = set()
        self.limit = getattr(cfg, "max_position_embeddings", None)
        self.seconds: defaultdict[str, float] = defaultdict(float)  # stage -> seconds, over the whole run

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Adds the block's seconds, its device work included, to self.seconds[name]."""
        clock = Clock(devices(self.model))
        try:
            yield
        finally:
            self.seconds[name] += clock.lap()

    def time_report(self) -> str:
        total = sum(self.seconds.values()) or 1.0
        parts = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        return "time by stage: " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in parts)

    @property
    def mode(self) -> str:
        return "agnostic" if self.query_agnostic else "aware"

    @torch.no_grad()
    def run(self, samples: Sequence[Sample], wanted: set[tuple[str, int | None]]) -> list[dict]:
        """Rows for `samples` (one task) and the wanted (method label, budget) pairs; the full cache always."""
        model = self.model
        with self.stage("tokenize"):
            enc = [encode_sample(self.tokenizer, s) for s in samples]
        max_new = max(s.max_new_tokens for s in samples)
        longest = max(len(a) + len(b) for a, b in enc)
        if self.limit is not None and longest + max_new > self.limit:
            raise LookaheadKVError(f"a {samples[0].task} prompt of {longest} tokens + {max_new} new tokens exceeds "
                                   f"the model's context of {self.limit}; lower --length")
        if self.query_agnostic:
            ids, valid = left_pad([a for a, _ in enc], self.pad_id, self.device)
            suffix = left_pad([b for _, b in enc], self.pad_id, self.device)
        else:
            ids, valid = left_pad([a + b for a, b in enc], self.pad_id, self.device)
            suffix = None
        methods = {k: m for k, m in self.methods.items()
                   if k not in self.dropped and m.evicts and any(w[0] == k for w in wanted)}
        rows_wanted = sorted({r for m in methods.values() for r in m.recorded()})
        with self.stage("prefill"):
            pf = prefill(model, ids, valid, record_rows=rows_wanted)
        copies = [Copy("full", None, pf, [None] * self.n_layers, pf.key_valid(self.n_layers), pf.length, 0.0)]
        for label, m in methods.items():
            scores, fixed, score_s = None, m, 0.0  # scores that depend on the budget: evict scores at each one
            if m.budget_free():
                t0 = time.perf_counter()
                try:
                    with self.stage(f"score {label}"):
                        scores = m.scores(model, pf.clone())
                except LookaheadKVError as e:
                    self.dropped.add(label)
                    self.note(f"method {label} dropped from this run: {e}")
                    continue
                score_s = time.perf_counter() - t0
                fixed = copy.copy(m)
                fixed.scores = lambda _model, _pf, _s=scores: _s  # the budget-free scores, computed once
            for b in self.budgets:
                if (label, b) not in wanted:
                    continue
                c = pf.clone()
                try:
                    with self.stage("evict"):
                        ev = evict(model, c, fixed, b)
                except LookaheadKVError as e:
                    if (label, b) not in self.skipped:
                        self.skipped.add((label, b))
                        self.note(f"{label} at budget {b} skipped: {e}")
                    continue
                copies.append(Copy(label, b, c, ev.kept, ev.key_valid, ev.budget, score_s + ev.seconds))
            del scores
        with self.stage("decode"):
            answers = decode_copies(model, copies, suffix, self.eos, max_new)
        with self.stage("truth, recall, rows"):
            return self.rows(samples, enc, pf, copies, answers)

    def answer_truths(self, enc, pf, full_answers) -> list[list[torch.Tensor] | None]:
        """Per sample, per layer [1, Hq, L]: the attention of the full cache's answer onto the prompt (None where
        it answered nothing)."""
        truths: list[list[torch.Tensor] | None] = []
        for i, full_ids in enumerate(full_answers):
            if not full_ids:  # no answer, no true importance
                truths.append(None)
            elif self.query_agnostic:
                truths.append(answer_importance(self.model, slice_prefill(pf, i), enc[i][1] + full_ids, len(full_ids)))
            else:
                truths.append(true_importance(self.model, slice_prefill(pf, i), torch.tensor([full_ids])))
        return truths

    def rows(self, samples, enc, pf, copies, answers, truths=None) -> list[dict]:
        """The evaluation rows of every copy (answers[0]: the full cache's); truths: answer_truths of answers[0],
        when the caller has them already (scripts/oracle_eval.py writes its rows through this)."""
        tok = self.tokenizer
        texts = [[tok.decode(a, skip_special_tokens=True).strip() for a in per] for per in answers]
        truth = stacked(self.answer_truths(enc, pf, answers[0]) if truths is None else truths)
        recalls: list[list[float | None]] = []
        if truth is not None:
            tops: dict = {}
            for c in copies:
                r = recall_per_sequence(truth, c.kept, c.effective, self.n_kv, pf.valid, tops).tolist()
                recalls.append([None if not a else v for a, v in zip(answers[0], r)])
        else:
            recalls = [[None] * len(samples) for _ in copies]
        rows = []
        for i, s in enumerate(samples):
            full = texts[0][i]
            prompt_tokens = len(enc[i][0]) + len(enc[i][1])
            for j, c in enumerate(copies):
                text = texts[j][i]
                recall = 1.0 if all(k is None for k in c.kept) else recalls[j][i]
                row = {"model": self.model_name, "task": s.task, "family": s.family,
                       "length": s.meta.get("length"), "sample": s.id, "mode": self.mode, "method": c.method,
                       "budget": c.budget, "prompt_tokens": prompt_tokens,
                       "context_tokens": len(enc[i][0]) if self.query_agnostic else prompt_tokens,
                       "kept_per_layer": sum(c.lengths()) / self.n_layers if c.budget is not None else None,
                       "answer": text, **score_answer(s.metric, s.answers, text, full), "recall": recall,
                       "eviction_s": round(c.seconds, 5)}
                if c.method == "full":
                    row["answers"] = s.answers
                rows.append(row)
        return rows


def stacked(truths: Sequence[list[torch.Tensor] | None]) -> list[torch.Tensor] | None:
    """Per-sample truths -> per layer [B, Hq, L], zeros for a sample without one; None if no sample has one."""
    have = next((t for t in truths if t is not None), None)
    if have is None:
        return None
    return [torch.cat([t[li] if t is not None else torch.zeros_like(have[li]) for t in truths])
            for li in range(len(have))]


def sample_id(task: str, length: int, seed: int, index: int) -> str:
    return f"{task}-{length}-s{seed}-{index}"


def make_samples(tokenizer, task: str, length: int, seed: int, indices: Sequence[int],
                 known: dict[str, Sample] | None = None) -> list[Sample]:
    """The samples of one batch, fitted to `length` with this tokenizer (taken from `known` when there)."""
    def measure(s: Sample) -> int:
        return sum(len(x) for x in encode_sample(tokenizer, s))

    out = []
    for i in indices:
        s = (known or {}).get(sample_id(task, length, seed, i))
        if s is None:
            s = make_sample(task, length, seed, i, measure)
            s.meta["length"] = length
        out.append(s)
    return out


def save_samples(samples: Sequence[Sample], path: str | Path) -> None:
    """Samples as JSONL (gzip when the name ends in .gz), e.g. made on one machine for a run on another."""
    import gzip
    from dataclasses import asdict

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def load_samples(path: str | Path) -> dict[str, Sample]:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return {s.id: s for s in (Sample(**json.loads(line)) for line in f if line.strip())}


def run_eval(model, tokenizer, tasks: str | Sequence[str], methods: dict[str, Method], budgets: Sequence[int],
             n: int, length: int, out: str | Path | None = None, model_name: str | None = None, seed: int = 0,
             batch: int = 8, query_agnostic: bool = False, time_limit: float | None = None,
             progress: bool = True, workers: int = 0, samples: dict[str, Sample] | None = None) -> list[dict]:
    """Evaluate every task x method x budget on n samples per task; returns the rows computed now (and
    appends them to `out`). Batches go round-robin over the tasks, so a run stopped by `time_limit` (seconds;
    checked between batches) leaves every task with about the same number of samples. `workers` > 0
    generates the samples in that many processes, ahead of the model; `samples` gives pre-made ones by id."""
    names = resolve_tasks(tasks)
    check_out(out)
    if n < 1 or batch < 1:
        raise LookaheadKVError("--n and --batch must be at least 1")
    if not budgets or any(b < 1 for b in budgets):
        raise LookaheadKVError("budgets must be positive token counts, e.g. --budgets 64,128,256")
    model_name = model_name or getattr(model, "name_or_path", "") or "model"
    methods = {k: m for k, m in methods.items() if m.evicts}  # the full cache is always run, as the reference
    distributed.ensure(next(model.parameters()).device)
    progress = progress and distributed.is_main()
    ev = Evaluator(model, tokenizer, model_name, methods, sorted(set(budgets)), query_agnostic,
                   note=lambda msg: tqdm.write(msg) if distributed.is_main() else None)
    pairs = [("full", None)] + [(k, b) for k in methods for b in ev.budgets]
    order = shards.plan_order(model_name, names, length, seed, ev.mode, batch, pairs)
    shards.start(out, order)  # rows an interrupted sharded run left in part files join `out` first
    done = {row_key(r) for r in read_rows(out)} if out is not None else set()

    def key(task: str, index: int, label: str, budget: int | None) -> tuple:
        return (model_name, task, length, sample_id(task, length, seed, index), ev.mode, label, budget)

    plan = []  # (task, indices, wanted pairs)
    rows_of = []  # rows each batch of the plan adds
    for start in range(0, n, batch):
        for t in names:
            idx = list(range(start, min(n, start + batch)))
            todo = [(i, p) for i in idx for p in pairs if key(t, i, *p) not in done]
            if todo:
                plan.append((t, sorted({i for i, _ in todo}), {p for _, p in todo}))
                rows_of.append(len(todo))
    # this process's every world()-th batch (all of them in one process); the plan goes round-robin over the
    # tasks, so each rank gets a share of every task
    plan, todo_rows = distributed.shard(plan), sum(distributed.shard(rows_of))
    sink = Sink(out if out is None or distributed.world() == 1 else shards.part_path(out, distributed.rank()))
    rows: list[dict] = []
    t_start = time.perf_counter()
    pool = None
    if workers > 0 and plan and not samples:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(make_samples, tokenizer, t, length, seed, idx) for t, idx, _ in plan]
    bar = tqdm(total=todo_rows, desc="eval", unit="row", disable=not progress, smoothing=0.1)
    try:
        for j, (t, idx, wanted) in enumerate(plan):
            if time_limit is not None and time.perf_counter() - t_start > time_limit:
                tqdm.write(f"time limit of {time_limit:.0f} s reached; stopping (rerun to resume)")
                break
            batch_samples = (futures[j].result() if pool is not None
                             else make_samples(tokenizer, t, length, seed, idx, samples))
            for row in ev.run(batch_samples, wanted):
                if row_key(row) in done or (row["method"], row["budget"]) not in wanted:
                    continue
                done.add(row_key(row))
                sink.write(row)
                rows.append(row)
                bar.update(1)
    finally:
        bar.close()
        sink.close()
        if ev.seconds and progress:
            tqdm.write(ev.time_report())
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if distributed.world() > 1:
        rows = shards.finish(out, rows, order)
    return rows
