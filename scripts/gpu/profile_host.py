"""Host or device: where the time of the two host-bound loops goes on the GPU, and what makes the host wait.

1. Issue 12, the single-pass prefill (Llama-3.1-8B shape, random bf16 weights), at each --contexts length, in
   three forms run interleaved: `plain` (the prompt alone), `rows` (the 32 lookahead rows riding along, no
   adapter) and `lookahead` (the rows and the adapter's hooks: the method as it runs). The bench's paired TTFT
   put the adapter at ~12 ms at 8K, where its kernels take ~2 ms of device time: is its host work exposed, and
   by what (a synchronising call, the allocator after `empty_cache`, or the host simply behind)?
2. Issue 11, training steps at batch 16 on the SmolLM2 shape (random weights, random truth, prompts of 1-3K
   tokens), as the trainer steps them (36% device-busy on the H200 on 2026-12-03), then the same steps from the
   same start with --cuda-graphs (lookaheadkv/graphed_step.py): speed, and the losses side by side.

For each: wall time (synchronised) and host time (until the call returns, unsynchronised: near the wall time,
the host is the bound); the device's busy share and the CUDA runtime calls by torch.profiler; the synchronising
calls by torch.cuda.set_sync_debug_mode, with the frames of ours, transformers' or PEFT's that made them.

    python scripts/gpu/profile_host.py --out $OUT            (GPU; --device cpu: a smoke test of the script)
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from statistics import median

import torch

from lookaheadkv import lookahead as la
from lookaheadkv.bench import shapes
from lookaheadkv.bench.timing import sync
from lookaheadkv.bench.trainer import _training_step
from lookaheadkv.graphed_step import GraphedStep
from lookaheadkv.methods import get_method
from lookaheadkv.prefill import ExtraRows, prefill
from lookaheadkv.train import Batch, batch_loss, left_pad

RUNTIME = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMalloc", "cudaFree",
           "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
           "cudaHostAlloc", "cudaFreeHost", "cudaStreamWaitEvent")
OURS = ("lookaheadkv", "transformers", "peft")


def timed(fn, device: torch.device, empty_cache: bool = False) -> tuple[float, float]:
    """(host seconds until fn returns, wall seconds until the device is done)."""
    if empty_cache and device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    host = time.perf_counter() - t0
    sync(device)
    wall = time.perf_counter() - t0
    del out
    return host, wall


def sync_sites(fn, device: torch.device) -> dict[str, int]:
    """Each synchronising call fn makes, by the last frames of ours / transformers / PEFT above it."""
    if device.type != "cuda":
        return {}
    sites: Counter = Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if any(o in f.filename for o in OURS)]
        sites[" <- ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in frames[::-1][:3])
              or "(no frame of ours)"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return dict(sites)


def profiled(fn, device: torch.device, label: str, tables: list[str]) -> dict:
    """Device-busy share and CUDA runtime calls of one call of fn; its operator table appended to `tables`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    device_s = sum(e.self_device_time_total for e in ka) / 1e6
    calls = {e.key: e.count for e in ka if e.key in RUNTIME}
    ops = sum(e.count for e in ka if e.key.startswith("aten::"))
    tables.append(f"## {label}: wall {wall * 1e3:.1f} ms under the profiler, device kernels {device_s * 1e3:.1f} ms\n\n"
                  + ka.table(sort_by="self_cpu_time_total", row_limit=25))
    return {"profiled_wall_ms": wall * 1e3, "device_ms": device_s * 1e3, "busy": device_s / wall if wall else None,
            "aten_ops": ops, "runtime_calls": calls}


def prefill_part(device: torch.device, contexts: list[int], repeats: int, tables: list[str]) -> list[dict]:
    model, _ = shapes.build("llama-3.1-8b" if device.type == "cuda" else "tiny", str(device),
                            torch.bfloat16 if device.type == "cuda" else torch.float32)
    la.create(model, n=32)
    extra = get_method("lookahead").prefill_extra(model)
    forms = {
        "plain": lambda ids: prefill(model, ids),
        "rows": lambda ids: prefill(model, ids, extra=ExtraRows(extra.embeds)),
        "lookahead": lambda ids: prefill(model, ids, extra=extra),
    }
    gen = torch.Generator().manual_seed(0)
    out = []
    for length in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen).to(device)
        for fn in forms.values():  # warm-up: kernels, plans, the allocator's blocks
            timed(lambda fn=fn, ids=ids: fn(ids), device)
        for empty in (False, True):
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in forms}
            for r in range(repeats):
                order = list(forms) if r % 2 == 0 else list(forms)[::-1]
                for k in order:
                    runs[k].append(timed(lambda k=k, ids=ids: forms[k](ids), device, empty_cache=empty))
            for k, rs in runs.items():
                out.append({"part": "prefill", "context": length, "form": k, "empty_cache": empty,
                            "host_ms": median(h for h, _ in rs) * 1e3, "wall_ms": median(w for _, w in rs) * 1e3,
                            "wall_runs_ms": [round(w * 1e3, 2) for _, w in rs]})
        for k, fn in forms.items():
            row = next(r for r in out if r["context"] == length and r["form"] == k and not r["empty_cache"])
            row["syncs"] = sync_sites(lambda fn=fn, ids=ids: fn(ids), device)
            row.update(profiled(lambda fn=fn, ids=ids: fn(ids), device, f"prefill {k} at {length}", tables))
        print(json.dumps([r for r in out if r["context"] == length and "syncs" in r], indent=1), flush=True)
    return out


def train_part(device: torch.device, steps: int, batch: int, tables: list[str]) -> list[dict]:
    cuda = device.type == "cuda"
    model, _ = shapes.build("smollm2-135m" if cuda else "tiny", str(device), torch.bfloat16 if cuda else torch.float32)
    model.requires_grad_(False)
    mod = la.create(model, 32, 8, 32)
    for p in mod.parameters(model):
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    low, high = (1000, 3000) if cuda else (40, 80)
    layers, hq = model.config.num_hidden_layers, model.config.num_attention_heads
    batches = []
    for _ in range(4):
        seqs = [torch.randint(0, model.config.vocab_size, (int(torch.randint(low, high, (1,), generator=gen)),),
                              generator=gen) for _ in range(batch)]
        ids, mask = left_pad(seqs)
        truth = (torch.rand(batch, layers, hq, ids.shape[1], generator=gen) * mask[:, None, None]).half()
        batches.append(Batch(ids.pin_memory() if cuda else ids, mask.pin_memory() if cuda else mask,
                             truth.pin_memory() if cuda else truth))
    params = mod.parameters(model)
    start = [p.detach().clone() for p in params]

    def restart() -> None:  # the module as it started
        with torch.no_grad():
            for p, x in zip(params, start):
                p.copy_(x)
                p.grad = None

    eager = _training_step(model, mod)  # the trainer's step without --cuda-graphs, its own fused AdamW

    def run(step, n: int) -> list[torch.Tensor]:
        return [step(batches[k % 4]) for k in range(n)]

    eager_losses = run(eager, 8)  # also the warm-up
    host, wall = timed(lambda: run(eager, steps), device)
    row = {"part": "train", "batch": batch, "steps": steps, "host_ms_per_step": host / steps * 1e3,
           "wall_ms_per_step": wall / steps * 1e3, "steps_per_s": steps / wall,
           "syncs_one_step": sync_sites(lambda: run(eager, 1), device)}
    row.update(profiled(lambda: run(eager, 3), device, f"3 training steps at batch {batch}", tables))
    if cuda:  # the same 8 steps from the same start with --cuda-graphs: a graph per batch shape, then replays
        restart()
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as _training_step's
        graphed = GraphedStep(lambda b: batch_loss(model, mod, b, grad=True, padded=True)[0], params, device)

        def graph_step(b) -> torch.Tensor:
            loss = graphed(b)
            opt.step()
            return loss

        graph_losses = run(graph_step, 8)
        host, wall = timed(lambda: run(graph_step, steps), device)
        row["graphs"] = {**graphed.report(), "host_ms_per_step": host / steps * 1e3,
                         "wall_ms_per_step": wall / steps * 1e3, "steps_per_s": steps / wall,
                         "eager_losses": [float(x) for x in eager_losses],
                         "graph_losses": [float(x) for x in graph_losses]}
        if not graphed.off:
            row["graphs"].update(profiled(lambda: run(graph_step, 3), device,
                                          f"3 graphed training steps at batch {batch}", tables))
    print(json.dumps(row, indent=1), flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"# Host or device ({device})", "", "## The single-pass prefill (Llama-3.1-8B shape, random bf16 weights)",
             "", "| context | form | empty_cache | host ms | wall ms | wall - plain | busy | aten ops | launches | "
             "mallocs / frees | syncs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] != "prefill":
            continue
        plain = next(x["wall_ms"] for x in rows if x["part"] == "prefill" and x["context"] == r["context"]
                     and x["form"] == "plain" and x["empty_cache"] == r["empty_cache"])
        c = r.get("runtime_calls", {})
        launches = sum(v for k, v in c.items() if "Launch" in k)
        lines.append(f"| {r['context']} | {r['form']} | {r['empty_cache']} | {r['host_ms']:.1f} | {r['wall_ms']:.1f} | "
                     f"{r['wall_ms'] - plain:+.1f} | {r['busy']:.0%} | {r['aten_ops']} | {launches} | "
                     f"{c.get('cudaMalloc', 0)} / {c.get('cudaFree', 0)} | {sum(r['syncs'].values())} |"
                     if "busy" in r and r["busy"] is not None else
                     f"| {r['context']} | {r['form']} | {r['empty_cache']} | {r['host_ms']:.1f} | {r['wall_ms']:.1f} | "
                     f"{r['wall_ms'] - plain:+.1f} | | | | | |")
    for r in rows:
        if r["part"] == "train":
            c = r.get("runtime_calls", {})
            lines += ["", f"## Training, batch {r['batch']} (SmolLM2 shape, random weights and truth, 1-3K tokens)", "",
                      f"{r['steps']} steps: {r['wall_ms_per_step']:.1f} ms a step ({r['steps_per_s']:.2f} steps/s), "
                      f"the host returning after {r['host_ms_per_step']:.1f} ms a step; under the profiler (3 steps) "
                      f"the device was busy {r['busy']:.0%}, {r['aten_ops'] / 3:.0f} aten ops and "
                      f"{sum(v for k, v in c.items() if 'Launch' in k) / 3:.0f} launches a step."]
            g = r.get("graphs")
            if g:
                diff = max(abs(a - b) for a, b in zip(g["eager_losses"], g["graph_losses"]))
                lines += ["", f"With --cuda-graphs: {g['wall_ms_per_step']:.1f} ms a step "
                          f"({g['steps_per_s']:.2f} steps/s, {g['steps_per_s'] / r['steps_per_s']:.2f}x), "
                          f"host {g['host_ms_per_step']:.1f} ms; "
                          f"{g['captured']} graphs captured, {g['replayed']} replays"
                          + (f", gave up: {g['gave_up']}" if "gave_up" in g else "")
                          + f". The first 8 steps' losses from the same start differ by at most {diff:.2e} "
                          f"(eager {g['eager_losses'][-1]:.5f}, graphed {g['graph_losses'][-1]:.5f} at step 8)."]
    lines += ["", "## Synchronising calls (one call each; frames of lookaheadkv / transformers / peft)", ""]
    for r in rows:
        s = r.get("syncs") or r.get("syncs_one_step") or {}
        label = f"prefill {r['form']} {r['context']}" if r["part"] == "prefill" else "one training step"
        for site, n in s.items():
            lines.append(f"- {label}: {n} x {site}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", default="8192,16384")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--parts", default="prefill,train")
    a = ap.parse_args()
    device = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tables: list[str] = []
    rows: list[dict] = []
    parts = a.parts.split(",")
    if "prefill" in parts:
        rows += prefill_part(device, [int(x) for x in a.contexts.split(",")], a.repeats, tables)
        if device.type == "cuda":  # the 8B model is gone with prefill_part's frame
            torch.cuda.empty_cache()
    if "train" in parts:
        rows += train_part(device, a.steps, 16, tables)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (out / "profile_host.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows},
                                                      indent=1) + "\n")
    (out / "profile_host.md").write_text(markdown(rows, name))
    (out / "profile_host_tables.txt").write_text("\n\n".join(tables) + "\n")
    print((out / "profile_host.md").read_text())


if __name__ == "__main__":
    main()
