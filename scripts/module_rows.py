"""A new lookahead module's evaluation rows beside the committed rows of the same samples, for one report.

    python scripts/module_rows.py NEW.jsonl results/eval/smollm2_4k.jsonl.gz OUT.jsonl

NEW holds rows of `lookaheadkv eval --methods lookahead:module=DIR` (a subset of samples and budgets); OUT gets
them labelled `lookahead`, the committed file's `lookahead` rows of those samples and budgets relabelled
`lookahead (previous module)`, and its other methods' rows of those samples and budgets, so that `lookaheadkv
report OUT` pairs the new module against the old one and every baseline on the same samples. The full cache's
rows come from NEW (its own run); the committed ones only check that both runs agree where nothing is evicted
(printed: how many full-cache answers are identical).
"""

from __future__ import annotations

import argparse
import json

from lookaheadkv.evaluation.runner import read_rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new")
    ap.add_argument("committed")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    new = list(read_rows(a.new))
    samples = {r["sample"] for r in new}
    budgets = {r["budget"] for r in new}
    rows = []
    for r in new:
        rows.append({**r, "method": "lookahead" if r["method"].startswith("lookahead") else r["method"]})
    full = {r["sample"]: r["answer"] for r in new if r["method"] == "full"}
    same = 0
    for r in read_rows(a.committed):
        if r["sample"] not in samples:
            continue
        if r["method"] == "full":
            same += full.get(r["sample"]) == r["answer"]
        elif r["budget"] in budgets:
            rows.append({**r, "method": "lookahead (previous module)" if r["method"] == "lookahead" else r["method"]})
    with open(a.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} rows ({len(new)} new) of {len(samples)} samples into {a.out}; full-cache answers identical "
          f"to the committed ones: {same} of {len(full)}")


if __name__ == "__main__":
    main()
