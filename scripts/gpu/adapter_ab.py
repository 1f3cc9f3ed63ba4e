"""A/B of the single-pass lookahead adapter's hook on the GPU (issue 12): the shipped form (lookahead.RowsLoRA:
fp32 deltas, ~15 launches a layer) against a form with its products in the model's dtype (bf16: the group's A
product, then one fused multiply-add into each member's output, ~11 launches a layer, no casts). On the CPU the
bf16 form moved 0.31-0.40% of the kept entries of the demo's two prompts at B=64-256 against a per-projection
fp32 reference, the shipped form 0.21-0.30%: both are bf16's own noise (a sum order changes the last bit).

Each form runs `lookaheadkv bench`'s TTFT runs (full, lookahead and its rows-only twin, so the adapter's paired
cost inside the prefill is measured as well as its hooks alone) on Llama-3.1-8B's shape with random bf16 weights
at 8K and 16K, and on SmolLM2 (real weights when converted under $LOOKAHEADKV_HOME) at 4K and 8K.

    python3 scripts/gpu/adapter_ab.py --out $OUT        # ~3 min on the H200; --rehearsal: tiny, on the CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lookaheadkv import lookahead as la
from lookaheadkv.bench.runner import Bench, BenchConfig
from lookaheadkv.errors import LookaheadKVError

SHIPPED = la.RowsLoRA.hook


def model_dtype_hook(self, layer, args, output):
    """The B form: products in the model's dtype, the delta added inside the second product."""
    x = args[0]
    if x.dim() != 3:
        raise LookaheadKVError("rows cannot be told apart")
    key, i, members = self.member[id(layer)]
    dt = output.dtype
    cache = self.__dict__.setdefault("_ab_weights", {})
    if key not in cache:
        at, _, _ = self.weights[key]
        bts = [(m.lora_B[la.ADAPTER].weight * m.scaling[la.ADAPTER]).T.to(dt).contiguous() for m in members]
        los = [sum(m.lora_A[la.ADAPTER].weight.shape[0] for m in members[:j]) for j in range(len(members))]
        cache[key] = (at.to(dt), bts, los)
    at, bts, los = cache[key]
    seen = self.inputs.get(key)
    if seen is None or seen[0] is not x:
        seen = (x, x[:, self.first:] @ at)
        self.inputs[key] = seen
    r = bts[i].shape[0]
    h = seen[1][..., los[i]:los[i] + r]
    y = output[:, self.first:]
    if y.shape[0] == 1:
        y[0].addmm_(h[0], bts[i])
    else:
        y.baddbmm_(h, bts[i].expand(y.shape[0], -1, -1))
    return output


FORMS = {"shipped": SHIPPED, "model_dtype": model_dtype_hook}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rehearsal", action="store_true")
    ap.add_argument("--smollm2-real", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.rehearsal:
        plans = [("tiny", dict(device="cpu", dtype="float32", contexts=[96], budget=32, repeats=2))]
    else:
        common = dict(device="cuda", dtype="bfloat16", repeats=5)
        plans = [("llama-3.1-8b", dict(common, contexts=[8192, 16384], budget=1024)),
                 ("smollm2-135m-instruct" if a.smollm2_real else "smollm2-135m",
                  dict(common, contexts=[4096, 8000], budget=256))]
    results, lines = {}, ["| model | context | form | adapter alone (ms) | adapter paired in prefill (ms) | "
                          "lookahead overhead, paired | stages |", "|---|---|---|---|---|---|---|"]
    for model, cfg in plans:
        built = None
        for form, hook in FORMS.items():
            la.RowsLoRA.hook = hook
            t0 = time.time()
            bench = Bench(BenchConfig(model=model, methods=["full", "lookahead"], decode_batches=[], plain=False,
                                      **cfg), built)
            built = (bench.model, bench.note)
            rows = bench.ttft(tqdm(disable=True))
            results[f"{model}/{form}"] = {"meta": bench.meta(), "ttft": rows, "seconds": time.time() - t0}
            for r in rows:
                if r["method"] == "lookahead":
                    lines.append(f"| {model} | {r['context']} | {form} | {r['stages_s']['adapter'] * 1e3:.2f} | "
                                 f"{r.get('adapter_paired_s', float('nan')) * 1e3:.2f} | {100 * r['overhead']:.2f}% | "
                                 f"{100 * r['overhead_stages']:.2f}% |")
            print(lines[-1], flush=True)
            (a.out / "adapter_ab.json").write_text(json.dumps(results, indent=1) + "\n")
        la.RowsLoRA.hook = SHIPPED
        del built, bench
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (a.out / "adapter_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
