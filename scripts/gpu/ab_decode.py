"""Same-run A/B of the target collector's decode-step attention: each planned batch collected twice, once with
the fused Triton decode kernel (kernels.decode_attention: K and V read once) and once on the PyTorch path it
replaces (kernels.disabled(): a bf16 logits product into fp32, mask, softmax, cast, V product), in alternating
order (A B, then B A, ...). The two variants' targets are compared: the share of prompts with identical greedy
responses (bf16 rounding may flip a near-tie) and, for those, the largest difference of the truth. The first
--reference prompts are also collected by the model in fp32, and each variant is compared with that: which of the
two bf16 paths strays from exact arithmetic (2026-12-07 on an H100: the two agreed on 57.5% of the responses).

    python scripts/gpu/ab_decode.py --prompts /tmp/lkv/prompts_bench.safetensors --out $OUT

On the CPU (--device cpu) both variants take the PyTorch path: a smoke test of the script alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from lookaheadkv import kernels
from lookaheadkv.bench.timing import Clock
from lookaheadkv.collect import collect_batch, eos_ids, plan_batches, tokens_that_fit
from lookaheadkv.models import load_model
from lookaheadkv.train import hardware
from lookaheadkv.train_data import load_prompts

FUSED, TORCH = "fused decode kernel", "PyTorch path"
VARIANTS = {FUSED: contextlib.nullcontext, TORCH: kernels.disabled}  # the context each variant runs in


def agreement(a: list, b: list) -> tuple[int, int, float]:
    """(prompts answered by both, of those with identical responses, max abs difference of their truth)."""
    both = same = 0
    diff = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        both += 1
        if torch.equal(x.response, y.response):
            same += 1
            diff = max(diff, (x.truth.float() - y.truth.float()).abs().max().item())
    return both, same, diff


def against_fp32(a, ids: list, eos: set[int], kept: dict) -> dict:
    """Each variant's targets for the first prompts against the same prompts collected by the model in fp32."""
    model, _ = load_model(a.model, device=a.device, dtype=torch.float32)
    ref = [None] * len(ids)
    for g in plan_batches([len(x) for x in ids], a.response_tokens, tokens_that_fit(model, a.response_tokens)):
        for i, t in zip(g, collect_batch(model, [ids[i] for i in g], a.response_tokens, eos,
                                         truth_dtype=torch.float16)):
            ref[i] = t
    out = {}
    for name, got in kept.items():
        both, same, diff = agreement([got.get(i) for i in range(len(ids))], ref)
        out[name] = {"answered_by_both": both, "identical_responses": same,
                     "identical_share": same / both if both else None, "truth_max_abs_diff": diff}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference", type=int, default=256, help="prompts also collected in fp32 (0: none)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    model, tok = load_model(a.model, device=a.device)
    ids = load_prompts(a.prompts)[0][: a.samples]
    eos = eos_ids(model, tok)
    budget = tokens_that_fit(model, a.response_tokens)
    groups = plan_batches([len(x) for x in ids], a.response_tokens, budget)
    param = next(model.parameters())
    served = kernels.pays(torch.zeros(1, 1, 1, 8, dtype=param.dtype, device=param.device))  # else both on PyTorch
    for name in VARIANTS:  # warm-up: the kernel's compiles, and the allocator grown to the first batch's buffers
        with VARIANTS[name]():
            collect_batch(model, [ids[i] for i in groups[0]], 8, eos)
    seconds = {k: 0.0 for k in VARIANTS}
    per_batch = []
    both = same = 0
    diff = 0.0
    kept = {name: {} for name in VARIANTS}  # the first --reference prompts' targets, by prompt index
    for k, g in enumerate(groups):
        batch = [ids[i] for i in g]
        got, secs = {}, {}
        for name in list(VARIANTS) if k % 2 == 0 else list(VARIANTS)[::-1]:
            with VARIANTS[name]():
                # the cached blocks of the other sizes released: each run allocates its batch's buffers (whichever
                # ran first paid that alone)
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                clock = Clock(model.device)
                got[name] = collect_batch(model, batch, a.response_tokens, eos, truth_dtype=torch.float16)
                secs[name] = clock.lap()
                seconds[name] += secs[name]
        per_batch.append({"prompts": len(g), "first": FUSED if k % 2 == 0 else TORCH, **secs})
        for name in VARIANTS:
            kept[name].update({i: t for i, t in zip(g, got[name]) if i < a.reference})
        n_both, n_same, d = agreement(got[FUSED], got[TORCH])
        both, same, diff = both + n_both, same + n_same, max(diff, d)
        print(f"batch {k + 1}/{len(groups)}: {len(g)} prompts, " + ", ".join(f"{v} {t:.1f} s" for v, t in secs.items())
              + f"; identical responses {same}/{both}", flush=True)
    res = {"model": a.model, "hardware": hardware(model.device), "prompts": len(ids), "batches": len(groups),
           "batch_tokens": budget, "response_cap": a.response_tokens,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds": seconds, "per_batch": per_batch, "prompts_per_s": {k: len(ids) / s for k, s in seconds.items()},
           "ratio": seconds[TORCH] / seconds[FUSED], "kernel_served": served,
           "agreement": {"answered_by_both": both, "identical_responses": same,
                         "identical_share": same / both if both else None, "truth_max_abs_diff": diff}}
    if a.reference:
        res["against_fp32"] = against_fp32(a, ids[: a.reference], eos, kept)
    base = seconds[TORCH]
    lines = [f"# Collector A/B: the decode step's attention ({a.model}, {res['hardware']}, {res['when']})", "",
             f"{len(ids)} prompts in {len(groups)} batches of up to {budget:,} buffer tokens, cap {a.response_tokens}; "
             "each batch collected with both variants in alternating order"
             + ("." if served else " (the kernel does not serve this device or dtype: both on the PyTorch path)."), "",
             "| variant | seconds | prompts/s | speed vs PyTorch path |", "|---|---|---|---|"]
    lines += [f"| {k} | {s:.2f} | {len(ids) / s:.1f} | {base / s:.3f}x |" for k, s in seconds.items()]
    share = f"{same / both:.4f}" if both else "n/a"
    lines += ["", f"Targets: {same} of {both} prompts answered by both have identical greedy responses ({share}); "
              f"for those the truth differs by at most {diff:.2e} (fp16 store)."]
    for name, r in res.get("against_fp32", {}).items():
        lines.append(f"Against the model in fp32 on the first {r['answered_by_both']} prompts, {name}: identical "
                     f"responses {r['identical_responses']} ({r['identical_share'] or 0:.4f}), truth within "
                     f"{r['truth_max_abs_diff']:.2e} on those.")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ab.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
