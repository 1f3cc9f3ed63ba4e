"""Does a method keep the needle? On RULER samples whose answer is a string in the context (the niah tasks), the
share of each (layer, KV head)'s kept set that holds the answer's value tokens and the asked key's tokens, per
method and budget, against the oracle that keeps what the reference answer itself attends to (teacher-forced
after the prompt). It tells a prediction failure (the kept sets miss the needle) from a use failure (the needle
is kept and the answer still goes wrong). CPU or GPU; the samples are an eval samples file.

    python scripts/needle_kept.py --model qwen2.5-coder-1.5b-instruct --samples .gpu/eval_samples_q4k.jsonl.gz \
        --task niah_multikey_3 --n 6 --budgets 256,512 --out results/eval/qwen2.5-coder-1.5b/needle_kept
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lookaheadkv.evaluation.metrics import mean_ci
from lookaheadkv.evaluation.runner import answer_importance, encode_sample, load_samples, render
from lookaheadkv.generate import select_kept
from lookaheadkv.methods import get_method, parse_methods
from lookaheadkv.models import load_model
from lookaheadkv.prefill import prefill
from lookaheadkv.scoring import score


def spans(tokenizer, text: str, needles: list[str]) -> list[list[int]]:
    """For each needle, the token indices of `text` whose characters overlap its LAST occurrence (the key is also
    asked in the question: the context's occurrence is the one before the question)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for s in needles:
        c0 = text.rfind(s)
        out.append([i for i, (a, b) in enumerate(offsets) if a < c0 + len(s) and b > c0] if c0 >= 0 else [])
    return out


def held(kept: list[torch.Tensor | None], idx: list[int], n_kv: int) -> torch.Tensor:
    """[layers x Hkv, len(idx)] bool: which of the positions `idx` each layer's KV head keeps ([1, Hkv, k] per
    layer; None: the layer keeps everything)."""
    want = torch.tensor(idx)
    return torch.cat([torch.ones(n_kv, len(idx), dtype=torch.bool) if k is None
                      else torch.stack([torch.isin(want, h) for h in k[0].cpu()]) for k in kept])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--samples", required=True, help="an eval samples file (.jsonl or .jsonl.gz)")
    ap.add_argument("--task", default="niah_multikey_3")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--budgets", default="256,512")
    ap.add_argument("--methods", default="lookahead,snapkv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    budgets = [int(b) for b in a.budgets.split(",")]
    samples = [s for s in load_samples(a.samples).values() if s.task == a.task][: a.n]
    if not samples:
        sys.exit(f"no {a.task} samples in {a.samples}")
    model, tok = load_model(a.model, device=a.device)
    methods = parse_methods(a.methods)  # specs with options too: "lookahead:pooling=avg:kernel=3"
    plain = get_method("lookahead")  # the oracle's selection: top-B per head, nothing forced, no pooling
    windows = sorted({m.prefill_rows() for m in methods.values() if m.prefill_rows()})
    n_kv = model.config.num_key_value_heads
    rows, t0 = [], time.perf_counter()
    for s in tqdm(samples, desc=f"{a.task} samples"):
        head_ids, tail_ids = encode_sample(tok, s)  # the evaluation's very prompt: context, then the rest
        ids = torch.tensor([head_ids + tail_ids], device=model.device)
        value, key = s.answers[0], s.meta["keys"][0]
        value_idx, key_idx = spans(tok, render(tok, s)[0], [value, key])  # both inside the context part
        pf = prefill(model, ids, None, record_rows=windows)
        answer = tok(" " + value, add_special_tokens=False)["input_ids"]
        truth = answer_importance(model, pf, answer, len(answer))
        scored = {"oracle (the answer's own attention)": score(truth, n_kv, "none", 1, "mean")}
        scored.update({name: m.scores(model, pf.clone()) for name, m in methods.items()})
        oracle = {}
        for name, sc in scored.items():
            for b in budgets:
                kept = select_kept(model, pf, methods.get(name, plain), b, sc)
                row = {"id": s.id, "method": name, "budget": b, "prompt_tokens": ids.shape[1],
                       "value_tokens": len(value_idx), "key_tokens": len(key_idx)}
                for part, idx in (("value", value_idx), ("key", key_idx)):
                    m = held(kept, idx, n_kv)
                    o = oracle.setdefault((part, b), m)  # the oracle comes first
                    row[f"{part}_held"] = float(m.float().mean())
                    row[f"{part}_of_oracle"] = float((m & o).sum() / o.sum().clamp_min(1))
                rows.append(row)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lines = [f"# Needle kept: {a.task}, {a.model}, {len(samples)} samples from {a.samples}", "",
             "    python " + " ".join(shlex.quote(x) for x in sys.argv), "",
             f"{a.device}, {time.perf_counter() - t0:.0f} s. Share of the answer's value tokens and of the asked key's "
             "tokens (in the context) inside each layer's and KV head's kept set, mean over layers, heads and "
             "samples (+- 95% CI over samples). The oracle keeps the top-B by the reference answer's own attention "
             "(teacher-forced after the prompt), under the same selection; 'of the oracle's': the share of the "
             "(layer, head, token) entries the oracle keeps that the method keeps too.", "",
             "| method | B | value tokens held | of the oracle's | key tokens held | of the oracle's |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["method"] for r in rows):
        for b in budgets:
            got = [r for r in rows if r["method"] == name and r["budget"] == b]
            cols = ("value_held", "value_of_oracle", "key_held", "key_of_oracle")
            cells = [mean_ci([r[c] for r in got]) for c in cols]
            lines.append(f"| {name} | {b} | " + " | ".join(f"{m:.3f} +- {h:.3f}" for m, h in cells) + " |")
    text = "\n".join(lines) + "\n"
    (a.out / "needle_kept.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
