"""Issue 12's measurements in one process (scripts/gpu/bench_issue12.sh runs it; its header says how).

Stages run in order of importance, each model built once for all its stages; a stage whose estimated time
exceeds what is left of the deadline is skipped and logged as such. After every stage the merged results of
its model are written to $OUT/<model>.json (render them with `python -m lookaheadkv.bench.report FILE DIR`),
so a call cut short still returns what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lookaheadkv.bench.report import check_targets, markdown
from lookaheadkv.bench.runner import Bench, BenchConfig

METHODS = ["full", "snapkv", "pyramidkv", "lookahead", "laq:k=8"]


@dataclasses.dataclass
class Stage:
    out: str  # results file stem: stages of one stem merge into one results dict
    seconds: float  # estimated wall time on the H200 (planning only)
    cfg: dict  # BenchConfig fields
    decode: bool = False  # the decode runs (the TTFT runs otherwise)
    env: dict = dataclasses.field(default_factory=dict)  # environment while it runs


def plan(rehearsal: bool, smollm2_real: bool) -> list[Stage]:
    """The GPU plan, or the same stages at tiny sizes on the CPU (rehearsal)."""
    if rehearsal:
        big, mid, tail, budget, small = "tiny", "tiny", [192], 64, "smollm2-135m"
        ctx, ctx_small, dec = [128, 160], [128], 160
        common = dict(device="cpu", dtype="float32", budget=budget, decode_budgets=[budget], repeats=1, warmup=1,
                      decode_steps=2)
    else:
        big, mid, tail, budget, small = "llama-3.1-8b", "qwen3-8b", [65536], 1024, "smollm2-135m"
        ctx, ctx_small, dec = [8192, 16384, 32768], [4096, 6144, 8000], 32768
        common = dict(device="cuda", dtype="bfloat16", budget=budget, decode_budgets=[budget], repeats=3, warmup=1,
                      decode_steps=16)
    # the rows-only twin of lookahead beside it: the adapter's cost inside the prefill, paired
    common.update(methods=METHODS, split_extra_rows=True, decode_batches=[])
    small_model = "smollm2-135m-instruct" if smollm2_real else small
    return [
        Stage("llama31_8b", 105, dict(common, model=big, contexts=ctx)),
        Stage("llama31_8b", 90, dict(common, model=big, contexts=ctx, decode_context=dec, decode_batches=[1, 8, 16],
                                     decode_methods=["snapkv", "pyramidkv", "lookahead"]), decode=True),
        # 64K: two paired repeats, no warm-up (every kernel is compiled by then, and every call allocates afresh)
        Stage("llama31_8b", 80, dict(common, model=big, contexts=tail, repeats=2, warmup=0)),
        Stage("smollm2", 30, dict(common, model=small_model, contexts=ctx_small, budget=256 if not rehearsal else 64)),
        Stage("qwen3_8b", 110, dict(common, model=mid, contexts=ctx)),
        Stage("qwen3_8b", 85, dict(common, model=mid, contexts=tail, repeats=2, warmup=0)),
    ]


def merge(old: dict | None, new: dict, stage: Stage, seconds: float) -> dict:
    """One results dict per model: TTFT rows and decode rows of every stage, the stages' configs in meta."""
    if old is None:
        old = {**new, "ttft": [], "decode": [], "capacity": {}}
        old["meta"]["stages"] = []
    old["ttft"] += new["ttft"]
    old["decode"] += new["decode"]
    old["capacity"] = new["capacity"] or old["capacity"]
    old["meta"]["stages"].append({"config": new["meta"]["config"], "decode": stage.decode, "env": stage.env,
                                  "seconds": seconds, "estimate_s": stage.seconds})
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-out"))
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("DEADLINE", 540)),
                    help="seconds from the start by which the last stage must end")
    ap.add_argument("--rehearsal", action="store_true", help="the same stages at tiny sizes on the CPU")
    ap.add_argument("--smollm2-real", action="store_true", help="the default model's real weights (converted)")
    a = ap.parse_args()
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    built: dict[str, tuple] = {}
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    for i, stage in enumerate(plan(a.rehearsal, a.smollm2_real)):
        left = a.deadline - (time.time() - t0)
        if stage.seconds > left and not a.rehearsal:
            print(f"== stage {i} {stage.out} skipped: needs ~{stage.seconds:.0f} s, {left:.0f} s left", flush=True)
            continue
        model = stage.cfg["model"]
        # the last stage's Bench holds its prompts and caches, and another model is dropped: both freed before
        # this stage allocates (Qwen3's 64K stage ran out of memory beside its 8K-32K stage's Bench)
        bench = None
        for name in [n for n in built if n != model]:  # one model on the device at a time
            del built[name]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = BenchConfig(**stage.cfg)
        print(f"== stage {i} {stage.out}: {model} contexts {cfg.contexts} decode={stage.decode} env={stage.env}",
              flush=True)
        s0 = time.time()
        old_env = {k: os.environ.get(k) for k in stage.env}
        os.environ.update(stage.env)
        try:
            bench = Bench(cfg, built.get(model))
            built[model] = (bench.model, bench.note)
            bar = tqdm(disable=True)
            ttft = [] if stage.decode else bench.ttft(bar)
            decode = bench.decode(bar) if stage.decode else []
            res = {"meta": {**bench.meta(), "command": command}, "ttft": ttft, "decode": decode,
                   "capacity": bench.capacity(ttft, decode) if decode else {}}
        except Exception as e:  # a failed stage is logged; the others still run
            print(f"== stage {i} {stage.out} failed: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            for k, v in old_env.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        merged = merge(results.get(stage.out), res, stage, time.time() - s0)
        merged["targets"] = check_targets(merged)
        results[stage.out] = merged
        (out / f"{stage.out}.json").write_text(json.dumps(merged, indent=1) + "\n")
        print(markdown(res), flush=True)
        print(f"== stage {i} done in {time.time() - s0:.0f} s ({time.time() - t0:.0f} s in all)", flush=True)
    for name, res in results.items():
        missed = [t for t in res["targets"] if not t["met"]]
        print(f"== {name}: {len(res['targets']) - len(missed)} of {len(res['targets'])} targets met", flush=True)
        for t in missed:
            print(f"   missed: {t['target']} at {t['context']}: {t['value']:.4g} (limit {t['limit']:.4g}); "
                  f"{t.get('where_the_time_goes', '')}", flush=True)


if __name__ == "__main__":
    main()
