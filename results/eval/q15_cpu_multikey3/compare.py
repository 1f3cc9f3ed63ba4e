"""The retrained 1.5B module (CPU rows here) beside the shipped module and SpecKV (the committed H200 rows of the
same samples) on RULER niah_multikey_3 at 4K: exact answers, and how many of the UUID's 36 characters each answer
copies before its first error (the copy's reach).

    python results/eval/q15_cpu_multikey3/compare.py > results/eval/q15_cpu_multikey3/compare.md
"""

import gzip
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
SPEC = "speckv:k=32:draft_model=qwen2.5-coder-0.5b-instruct"


def reach(answer: str, gold: str) -> int:
    got = answer.strip(" :.\n")
    n = 0
    while n < min(len(got), len(gold)) and got[n] == gold[n]:
        n += 1
    return n


new = [json.loads(x) for x in (HERE / "rows.jsonl").read_text().splitlines()]
gold = {r["sample"]: r["answers"][0] for r in new if r["method"] == "full"}
old = [json.loads(x) for x in gzip.open(HERE.parent / "q15_4k.jsonl.gz")]
rows = [r for r in new if r["method"] != "full"] + [
    r for r in old if r["sample"] in gold and r["method"] in ("lookahead", SPEC) and r["budget"] in (256, 512, 1024)]
cell = defaultdict(list)
for r in rows:
    name = {"lookahead": "shipped module (H200, bf16)", SPEC: "speckv, 0.5B drafting (H200, bf16)"}.get(
        r["method"], "retrained module (CPU, fp32)")
    cell[name, r["budget"]].append((r["score"], reach(r["answer"], gold[r["sample"]])))
print(f"niah_multikey_3, 4K, samples {len(gold)} (the first of the committed 25): exact answers / mean characters "
      "of the 36-character UUID copied before the first error\n")
print("| method | B=256 | B=512 | B=1024 |\n|---|---|---|---|")
for name in sorted({k[0] for k in cell}):
    out = []
    for b in (256, 512, 1024):
        v = cell[name, b]
        out.append(f"{sum(s for s, _ in v):.0f}/{len(v)}, {sum(c for _, c in v) / len(v):.1f}" if v else "-")
    print(f"| {name} | " + " | ".join(out) + " |")
