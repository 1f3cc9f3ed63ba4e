"""Paired test-split recall and F1: the 22K-prompt module against the shipped one, same 200 samples (bf16 rows).
python results/train/smollm2_h200/runs/2026-12-03_22k/paired.py"""
import json
import math
from pathlib import Path

here = Path(__file__).parent


def rows(p):
    out = {}
    for line in open(p):
        r = json.loads(line)
        if r["method"] == "lookahead":
            out[(r["sample"], r["budget"])] = r
    return out


new, old = rows(here / "recall_bf16/rows.jsonl"), rows(here / "../../../../lookahead/rows_bf16.jsonl")
print("| budget | shipped recall | 22K recall | paired diff (95%) | shipped F1 | 22K F1 | paired F1 diff |")
print("|---|---|---|---|---|---|---|")
for b in (32, 64, 128, 256):
    keys = [k for k in new if k[1] == b and k in old]

    def stat(f):
        d = [f(new[k]) - f(old[k]) for k in keys]
        m = sum(d) / len(d)
        s = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
        return m, 1.97 * s / math.sqrt(len(d))
    mo = sum(old[k]["recall"] for k in keys) / len(keys)
    mn = sum(new[k]["recall"] for k in keys) / len(keys)
    dm, ci = stat(lambda r: r["recall"])
    fk = [k for k in keys if new[k]["f1"] is not None and old[k]["f1"] is not None]
    if fk:
        keys = fk
        fo = sum(old[k]["f1"] for k in fk) / len(fk)
        fn = sum(new[k]["f1"] for k in fk) / len(fk)
        fd, fci = stat(lambda r: r["f1"])
        f = f"{fo:.3f} | {fn:.3f} | {fd:+.3f} ± {fci:.3f}"
    else:
        f = "| |"
    print(f"| {b} | {mo:.3f} | {mn:.3f} | {dm:+.3f} ± {ci:.3f} (n={len([k for k in new if k[1] == b and k in old])}) | {f} |")
