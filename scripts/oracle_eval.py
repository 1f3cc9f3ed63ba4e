"""The ceiling of score-based eviction on a task set: the oracle keeps, per layer and KV head, the top-B prompt
entries by the attention of the model's own full-cache greedy answer (which no real method has: it needs the
answer), with the lookahead method's selection (nothing forced, no pooling, GQA mean), then decodes on that cache.
What a method scores below the oracle is prediction; what the oracle scores below the full cache is the budget.
Rows are the evaluation's own (`lookaheadkv report` reads them; method "oracle"), from the same samples file:

    python scripts/oracle_eval.py --samples s4k.jsonl.gz --n 8 --budgets 64,128 --out oracle_4k.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lookaheadkv.evaluation import runner
from lookaheadkv.generate import evict
from lookaheadkv.methods import Method
from lookaheadkv.models import load_model
from lookaheadkv.prefill import prefill


@dataclass
class Oracle(Method):
    """Top-B by a given importance (per layer [B, Hq, L]); never registered: no real method knows it."""

    name = "oracle"
    window: int = 0
    keep_window: bool = False
    pooling: str = "none"
    kernel: int = 1
    truth: list | None = None

    def glimpse(self, model, pf):
        return self.truth


@torch.no_grad()
def oracle_rows(ev: runner.Evaluator, samples, max_new: int) -> list[dict]:
    """Full-cache and oracle rows of one batch of samples (query-aware, as the evaluation's default)."""
    model, layers = ev.model, ev.n_layers
    enc = [runner.encode_sample(ev.tokenizer, s) for s in samples]
    ids, valid = runner.left_pad([a + b for a, b in enc], ev.pad_id, ev.device)
    pf = prefill(model, ids, valid)
    full = runner.Copy("full", None, pf, [None] * layers, pf.key_valid(layers), pf.length, 0.0)
    first = runner.decode_copies(model, [full], None, ev.eos, max_new)[0]
    truths = ev.answer_truths(enc, pf, first)  # also what the rows' recall is judged against
    truth = runner.stacked(truths)
    copies = []
    for b in ev.budgets:
        c = pf.clone()
        e = evict(model, c, Oracle(truth=truth), b)
        copies.append(runner.Copy("oracle", b, c, e.kept, e.key_valid, e.budget, e.seconds))
    answers = [first] + runner.decode_copies(model, copies, None, ev.eos, max_new)
    return ev.rows(samples, enc, pf, [full] + copies, answers, truths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--samples", required=True, help="an evaluation samples file (lookaheadkv eval --only-samples)")
    ap.add_argument("--n", type=int, default=8, help="the first n samples of each task")
    ap.add_argument("--budgets", default="64,128")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    model, tok = load_model(a.model, device=a.device)
    ev = runner.Evaluator(model, tok, a.model, {}, [int(b) for b in a.budgets.split(",")])
    by_task: dict[str, list] = {}
    for s in runner.load_samples(a.samples).values():
        by_task.setdefault(s.task, []).append(s)
    batches = [group[i:i + a.batch] for group in (g[: a.n] for g in by_task.values())
               for i in range(0, len(group), a.batch)]
    with open(a.out, "w") as f:
        for batch in tqdm(batches, desc="oracle batches"):
            for row in oracle_rows(ev, batch, max(s.max_new_tokens for s in batch)):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
