"""How many operations (kernel launches on a GPU) the single-pass lookahead adapter adds to a prefill: the
grouped rows-only LoRA (lookahead.RowsLoRA) against one hook per projection (the form it replaced), counted
with a dispatch mode on the CPU, on SmolLM2-135M's shape with random weights. The adapter is host-bound on a
GPU (issue 12: ~35 ms for ~1.5K launches on the Llama-3.1-8B shape), so its launch count is what moves.

    python scripts/adapter_ops.py --out results/bench/adapter_ops
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from op_count import Count
from transformers import LlamaConfig, LlamaForCausalLM

from lookaheadkv import lookahead as la
from lookaheadkv.attention import install
from lookaheadkv.bench.timing import median, time_calls
from lookaheadkv.errors import LookaheadKVError
from lookaheadkv.prefill import ExtraRows, prefill


def per_projection_hook(first: int):
    """The previous adapter: on each LoRA projection, its own delta on the rows >= first."""
    def hook(layer, args, output):
        if args[0].dim() != 3:
            raise LookaheadKVError("rows cannot be told apart")
        a, b = layer.lora_A[la.ADAPTER], layer.lora_B[la.ADAPTER]
        delta = b(a(args[0][..., first:, :].to(a.weight.dtype))) * layer.scaling[la.ADAPTER]
        output[..., first:, :] = (output[..., first:, :] + delta).to(output.dtype)
        return output
    return hook


def count(model, mod, ids, form: str) -> tuple[int, int, torch.Tensor]:
    length = ids.shape[1]
    if form == "none":
        extra = ExtraRows(la.lookahead_embeds(model, mod, 1))
    elif form == "grouped":
        extra = la.extra_rows(model, mod, 1)
    else:
        def active(first):
            import contextlib

            @contextlib.contextmanager
            def hooks():
                hs = [layer.register_forward_hook(per_projection_hook(first)) for layer in la._lora_layers(model)]
                try:
                    yield
                finally:
                    for h in hs:
                        h.remove()
            return hooks()
        extra = ExtraRows(la.lookahead_embeds(model, mod, 1), active)
    prefill(model, ids, extra=extra)  # warm-up (the grouped form builds its stacked weights once)
    with Count() as c:
        pf = prefill(model, ids, extra=extra)
    assert pf.length == length
    kernels = sum(c.kernels().values())
    return sum(c.ops.values()), kernels, torch.stack(pf.extra.mean())


def host_setup(model, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of host time: entering and leaving `lora_rows` for a single pass, and the module walks it
    made before the layers and groups were kept from injection (the old scan, run here as it was)."""
    from peft.tuners.lora import LoraLayer

    def enter():
        with la.lora_rows(model, 1):
            pass

    def old_scan():
        layers = [m for m in model.modules() if isinstance(m, LoraLayer) and la.ADAPTER in m.lora_A]
        for _, module in model.named_modules():
            for child in module.children():
                _ = child in layers

    def ms(fn):
        return 1e3 * median(time_calls(fn, "cpu", repeats, warmup=1))

    return {"enter_ms": ms(enter), "scan_ms": ms(old_scan)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--length", type=int, default=256)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    model = install(LlamaForCausalLM(cfg).eval())
    mod = la.create(model, 32, 8, 32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lookahead." in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 49152, (1, a.length))
    base, base_k, _ = count(model, mod, ids, "none")
    rows = {}
    for form in ("per-projection", "grouped"):
        total, kernels, scores = count(model, mod, ids, form)
        rows[form] = {"ops": total, "adapter_ops": total - base, "adapter_kernels": kernels - base_k,
                      "scores": scores}
    diff = float((rows["grouped"]["scores"] - rows["per-projection"]["scores"]).abs().max())
    host = host_setup(model)
    layers = cfg.num_hidden_layers
    lines = [f"# Operations the single-pass lookahead adapter adds to a prefill ({a.length}-token prompt + 32 rows, "
             f"SmolLM2-135M shape, {len(la._lora_layers(model))} LoRA projections, random weights, CPU)", "",
             f"prefill without the adapter: {base} operations, {base_k} of them kernels (not views)", "",
             "| adapter form | operations added | kernels added (not views) | kernels per decoder layer |",
             "|---|---|---|---|"]
    for form, r in rows.items():
        lines.append(f"| {form} | {r['adapter_ops']} | {r['adapter_kernels']} | {r['adapter_kernels'] / layers:.1f} |")
    lines += ["", "Host time to enter and leave the single pass's adapter (this CPU, median of 20; before any kernel "
              f"of the prefill, so nothing hides it): {host['enter_ms']:.2f} ms, against {host['scan_ms']:.2f} ms "
              "for the two walks over the model's modules that entering it made until 2026-12-03 (finding the LoRA "
              "layers, then their parents); they are now found once, at injection."]
    lines += ["", f"Largest difference of the lookahead scores between the two forms: {diff:.2e} (fp32). In bf16 on "
              "a GPU each form adds one cast per product's input (grouped: 4 a layer, per projection: 7). Counted "
              "on the CPU: the time these launches cost on the H200 is for its next run of `lookaheadkv bench`.",
              "Command: `python scripts/adapter_ops.py --out results/bench/adapter_ops`"]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "adapter_ops.md").write_text("\n".join(lines) + "\n")
    (a.out / "adapter_ops.json").write_text(json.dumps(
        {"base_ops": base, "base_kernels": base_k,
         **{k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in rows.items()},
         "max_score_difference": diff, "host_ms": host}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
