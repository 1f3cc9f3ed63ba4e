"""Evaluation in rounds for a GPU lease: one process, one model load, rounds run in the order given, each until
its samples are done or the time is spent, rows appended one flushed line each (a run cut short keeps them, and
a rerun resumes where it stopped).

A round is LENGTH:TASKS:N:NAME: the first N samples of each task at that length, into NAME.jsonl. Rounds with a
growing N on one file deepen it (samples 0-9 of every task and length first, then 10-24, ...), so whatever the
time allows covers every task and length, which the RULER mean needs.

    python3 scripts/gpu/eval_rounds.py --model qwen2.5-coder-1.5b-instruct --samples a.jsonl.gz,b.jsonl.gz \
        --methods "snapkv,laq,speckv:draft_model=qwen2.5-coder-0.5b-instruct" --budgets 64,128,256,512,1024 \
        --plan "4096:ruler,qa:10:q15_4k;8192:ruler:10:q15_8k" --out /tmp/lkv/rows --seconds 600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def label(spec: str) -> str:
    """A method's row label: its spec without the module path."""
    return ":".join(p for p in spec.split(":") if not p.startswith("module="))


def parse_plan(text: str) -> list[tuple[int, str, int, str]]:
    """"4096:ruler,qa:10:x_4k;..." -> [(4096, "ruler,qa", 10, "x_4k"), ...]."""
    rounds = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        length, tasks, n, name = part.split(":")
        rounds.append((int(length), tasks, int(n), name))
    return rounds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", required=True, help="comma-separated sample files (made on the CPU machine)")
    ap.add_argument("--methods", required=True, help="as `lookaheadkv eval --methods` (the full cache always runs)")
    ap.add_argument("--budgets", required=True)
    ap.add_argument("--plan", required=True, help="rounds LENGTH:TASKS:N:NAME;...")
    ap.add_argument("--out", required=True, help="folder of the NAME.jsonl files")
    ap.add_argument("--seconds", type=float, required=True, help="for all rounds together")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)

    import torch

    from lookaheadkv.evaluation import runner
    from lookaheadkv.methods import parse_methods
    from lookaheadkv.models import load_model

    t0 = time.perf_counter()
    samples = {k: v for f in a.samples.split(",") if f for k, v in runner.load_samples(f).items()}
    # A module's path names no setting: "lookahead:module=/tmp/..." is labelled "lookahead", as the rows of the other
    # lanes and leases are (their merge is by label)
    methods = {label(k): m for k, m in parse_methods(a.methods).items()}
    model, tok = load_model(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    print(f"{len(samples)} samples; methods {', '.join(methods)}; model loaded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in a.budgets.split(",")]
    for length, tasks, n, name in parse_plan(a.plan):
        left = a.seconds - (time.perf_counter() - t0)
        if left < 30:  # a batch at 16K takes longer than that: stop cleanly instead of overrunning
            print(f"skipped {name} n={n}: {left:.0f} s left", flush=True)
            continue
        t = time.perf_counter()
        rows = runner.run_eval(model, tok, tasks, methods, budgets, n, length, f"{a.out}/{name}.jsonl",
                               model_name=a.model, batch=min(a.batch, n), time_limit=left - 20, samples=samples)
        gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"{name} n={n}: {len(rows)} rows in {time.perf_counter() - t:.0f} s (limit {left - 20:.0f} s); "
              f"peak GPU memory {gib:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
