"""Paired test-split recall and answer F1: the 22K-prompt module against the shipped one, on the same 200 samples
(bf16 rows of scripts/lookahead_eval.py). python results/train/smollm2_h200/runs/2026-12-03_22k/paired.py"""
import json
import subprocess
from pathlib import Path

from lookaheadkv.evaluation.metrics import mean_ci

here = Path(__file__).parent


def rows(lines) -> dict:
    return {(r["sample"], r["budget"]): r for r in map(json.loads, lines) if r["method"] == "lookahead"}


# the module shipped before this one: its rows as results/lookahead held them until it was replaced (commit 4769392)
before = subprocess.run(["git", "show", "4769392:results/lookahead/rows_bf16.jsonl"], cwd=here, capture_output=True,
                        check=True, text=True).stdout.splitlines()
new, old = rows(open(here / "recall_bf16/rows.jsonl")), rows(before)


def cell(field: str, keys: list) -> str:
    if not keys:
        return "| |"
    d, ci = mean_ci([new[k][field] - old[k][field] for k in keys])
    o, n = (sum(x[k][field] for k in keys) / len(keys) for x in (old, new))
    return f"{o:.3f} | {n:.3f} | {d:+.3f} ± {ci:.3f}"


print("| budget | samples | shipped recall | 22K recall | paired diff (95%) | shipped F1 | 22K F1 | paired F1 diff |")
print("|---|---|---|---|---|---|---|---|")
for b in (32, 64, 128, 256):
    keys = [k for k in new if k[1] == b and k in old]
    f1 = [k for k in keys if new[k]["f1"] is not None and old[k]["f1"] is not None]
    print(f"| {b} | {len(keys)} | {cell('recall', keys)} | {cell('f1', f1)} |")
