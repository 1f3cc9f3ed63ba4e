"""How many operations (kernel launches on a GPU) the trainer's two hot loops issue: one decode step of the
target collector (lookaheadkv.collect.collect_batch) against one decode step of plain transformers on a
DynamicCache, and one training step (train.batch_loss + backward + clip + fused AdamW) split into its parts.
Counted with a dispatch mode on the CPU, on SmolLM2-135M's shape (30 layers) with random weights. On the H200
both loops ran far below what their GPU work needs (results/train/smollm2_h200: ~67 ms a decode step of 512 rows,
0.44 s a training step), so their launch counts say how host-bound they can be.

    python scripts/trainer_ops.py --out results/train/ops
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from op_count import Count
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lookaheadkv import lookahead as la
from lookaheadkv import train as tr
from lookaheadkv.attention import install
from lookaheadkv.collect import collect_batch
from lookaheadkv.prefill import prefill


def counted(fn) -> Counter:
    with Count() as c:
        fn()
    return c.kernels()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    # SmolLM2-135M's shape; vocabulary cut (the LM head is one matmul whatever its size)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    install(model)
    prompts = [torch.randint(3, 2000, (n,)) for n in (60, 80, 70, 90)]
    res: dict = {"shape": "SmolLM2-135M (30 layers, 9 query / 3 KV heads), random weights", "torch": torch.__version__}

    # 1. a decode step: collect_batch with 9 response tokens minus with 1, over 8
    with torch.no_grad():
        one = counted(lambda: collect_batch(model, prompts, 1, set()))
        nine = counted(lambda: collect_batch(model, prompts, 9, set()))
    step = {k: v / 8 for k, v in (nine - one).items()}
    ids = torch.randint(3, 2000, (4, 90))
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        plain = counted(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True))
    res["decode_step"] = {"collect": sum(step.values()), "plain_transformers": sum(plain.values()),
                          "collect_top": dict(sorted(step.items(), key=lambda x: -x[1])[:12]),
                          "plain_top": dict(plain.most_common(12))}

    # 2. a training step at batch 16, by part
    model.requires_grad_(False)
    mod = la.create(model, 32, 8, 32)
    params = mod.parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as the trainer does on CUDA
    with torch.no_grad():
        targets = [t for t in collect_batch(model, [torch.randint(3, 2000, (100,)) for _ in range(16)], 2, set())
                   if t is not None]
    ids, mask = tr.left_pad([t.ids for t in targets])
    loss, _ = tr.batch_loss(model, mod, targets, grad=True)  # a first step: AdamW makes its state once
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    parts = {}
    with torch.no_grad():
        parts["prefill (no grad)"] = counted(lambda: prefill(model, ids, mask))
    holder = {}

    def whole():
        holder["loss"], _ = tr.batch_loss(model, mod, targets, grad=True)
    parts["batch_loss (prefill + lookahead pass + loss)"] = counted(whole)
    parts["backward"] = counted(lambda: holder["loss"].backward())
    parts["clip_grad_norm_"] = counted(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
    parts["AdamW (fused)"] = counted(opt.step)
    res["train_step"] = {k: sum(v.values()) for k, v in parts.items()}
    res["train_step"]["lookahead pass + loss"] = (res["train_step"]["batch_loss (prefill + lookahead pass + loss)"]
                                                  - res["train_step"]["prefill (no grad)"])
    res["lora_modules"] = len(la._lora_layers(model))
    res["backward_top"] = dict(parts["backward"].most_common(12))

    a.out.mkdir(parents=True, exist_ok=True)
    d = res["decode_step"]
    lines = [f"# Operations per step of the trainer's loops ({res['shape']}, torch {res['torch']})", "",
             "| decode step | operations |", "|---|---|",
             f"| lookaheadkv.collect (one greedy step, its attention recorded) | {d['collect']:.0f} |",
             f"| plain transformers, DynamicCache | {d['plain_transformers']:.0f} |", "",
             "| training step, batch 16 | operations |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res["train_step"].items()]
    lines += ["", f"LoRA modules: {res['lora_modules']} (each with its own A and B product, forward and backward).",
              "Most frequent in backward: " + ", ".join(f"{k} {v}" for k, v in res["backward_top"].items())]
    text = "\n".join(lines)
    (a.out / "trainer_ops.md").write_text(text + "\n")
    (a.out / "trainer_ops.json").write_text(json.dumps(res, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
