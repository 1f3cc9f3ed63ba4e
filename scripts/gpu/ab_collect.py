"""Same-run A/B of the target collector's host copy: each planned batch collected twice, once with the truth
copied asynchronously into pinned memory (lookaheadkv.collect as it is) and once through the synchronous copy
into pageable memory it replaced (`x.cpu()`), in alternating order; identical targets asserted.

    python scripts/gpu/ab_collect.py --prompts /tmp/lkv/prompts_bench.safetensors --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lookaheadkv import collect
from lookaheadkv.bench.timing import Clock
from lookaheadkv.collect import collect_batch, eos_ids, plan_batches, tokens_that_fit
from lookaheadkv.models import load_model
from lookaheadkv.train import hardware
from lookaheadkv.train_data import load_prompts

PINNED = collect._to_host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    model, tok = load_model(a.model, device=a.device)
    ids = load_prompts(a.prompts)[0][: a.samples]
    eos = eos_ids(model, tok)
    budget = tokens_that_fit(model, a.response_tokens)
    groups = plan_batches([len(x) for x in ids], a.response_tokens, budget)
    collect_batch(model, ids[:4], 8, eos)  # warm-up
    variants = {"pinned, asynchronous": PINNED, "pageable, synchronous": lambda x: x.cpu()}
    seconds = {k: 0.0 for k in variants}
    for k, g in enumerate(groups):
        batch = [ids[i] for i in g]
        got = {}
        for name in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
            collect._to_host = variants[name]
            clock = Clock(model.device)
            got[name] = collect_batch(model, batch, a.response_tokens, eos, truth_dtype=torch.float16)
            seconds[name] += clock.lap()
        collect._to_host = PINNED
        a_, b_ = got.values()
        assert all((x is None and y is None) or (torch.equal(x.response, y.response) and torch.equal(x.truth, y.truth))
                   for x, y in zip(a_, b_)), "the two copies gave different targets"
        print(f"batch {k + 1}/{len(groups)}: {len(g)} prompts, " + ", ".join(f"{n} {s:.1f} s" for n, s in
                                                                          seconds.items()), flush=True)
    res = {"model": a.model, "hardware": hardware(model.device), "prompts": len(ids), "batches": len(groups),
           "batch_tokens": budget, "response_cap": a.response_tokens,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds": seconds, "prompts_per_s": {k: len(ids) / s for k, s in seconds.items()}}
    base = seconds["pageable, synchronous"]
    lines = [f"# Collector A/B: the truth's host copy ({a.model}, {res['hardware']}, {res['when']})", "",
             f"{len(ids)} prompts in {len(groups)} batches of up to {budget:,} buffer tokens, cap {a.response_tokens}; "
             "each batch collected with both copies in alternating order, targets identical.", "",
             "| host copy | seconds | prompts/s | vs pageable |", "|---|---|---|---|"]
    lines += [f"| {k} | {s:.1f} | {len(ids) / s:.1f} | {base / s:.3f}x |" for k, s in seconds.items()]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ab_collect.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "ab_collect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
