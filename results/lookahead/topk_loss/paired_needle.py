"""B minus A, and A minus the shipped module (its committed rows), in value_of_oracle: paired by sample, per task
and pooled. `python paired_needle.py TASK...` from any folder."""
import json
import sys
from pathlib import Path

from lookaheadkv.evaluation.metrics import mean_ci

A, B = "lookahead:module=/tmp/tk/A", "lookahead:module=/tmp/tk/B"
here = Path(__file__).resolve().parent
shipped_dir = here.parents[1] / "eval/cpu_lookahead_options_2026-12-07/needle_kept"  # the shipped module's rows
pooled = {}
lines = ["| task | B | shipped | A: KL | B: KL + 0.1 top-64 | B - A (paired) | A - shipped (paired) |",
         "|---|---|---|---|---|---|---|"]
for task in sys.argv[1:]:
    rows = [json.loads(x) for x in open(here / "needle" / task / "rows.jsonl")]
    ship = [json.loads(x) for x in open(shipped_dir / task / "rows.jsonl")]
    get = lambda rs, m, b: {r["id"]: r["value_of_oracle"] for r in rs if r["method"] == m and r["budget"] == b}  # noqa: E731
    for b in (64, 128):
        a, bb, s = get(rows, A, b), get(rows, B, b), get(ship, "lookahead", b)
        ids = sorted(a)
        d, e = [bb[i] - a[i] for i in ids], [a[i] - s[i] for i in ids]
        pooled.setdefault(b, ([], []))
        pooled[b][0].extend(d)
        pooled[b][1].extend(e)
        m = lambda x: sum(x) / len(x)  # noqa: E731
        lines.append(f"| {task} | {b} | {m([s[i] for i in ids]):.3f} | {m([a[i] for i in ids]):.3f} | "
                     f"{m([bb[i] for i in ids]):.3f} | "
                     f"{mean_ci(d)[0]:+.3f} +- {mean_ci(d)[1]:.3f} | {mean_ci(e)[0]:+.3f} +- {mean_ci(e)[1]:.3f} |")
for b, (d, e) in pooled.items():
    lines.append(f"| all ({len(d)} samples) | {b} | | | | {mean_ci(d)[0]:+.3f} +- {mean_ci(d)[1]:.3f} | "
                 f"{mean_ci(e)[0]:+.3f} +- {mean_ci(e)[1]:.3f} |")
print("\n".join(lines))
