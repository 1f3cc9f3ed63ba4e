"""README tables of an evaluation, from its committed rows only: per method the mean score by task family, length
and KV budget, and lookahead minus each method paired by sample (mean ± 95% CI), plus the module's training cost
from its lookahead.json.

    python scripts/readme_table.py results/eval/q15_*.jsonl.gz \
        --module lookaheadkv/modules/qwen2.5-coder-1.5b-instruct --readme README.md --key qwen2.5-coder-1.5b-instruct

With --readme the tables replace what stands between `<!-- results:KEY -->` and `<!-- /results:KEY -->`; files that
hold no rows give the line "not measured yet", so no number appears that was not measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lookaheadkv.evaluation.metrics import mean_ci  # noqa: E402
from lookaheadkv.evaluation.report import shared_samples  # noqa: E402
from lookaheadkv.evaluation.runner import read_rows  # noqa: E402

FAMILIES = ("ruler", "qa", "fidelity")


def _short(method: str) -> str:
    return method.split(":")[0] if method.startswith(("speckv", "laq", "lookahead")) else method


def columns(rows: Sequence[dict], budgets: Sequence[int] | None) -> list[tuple[str, int, int]]:
    """(family, length, budget) of every cell present, families in their order, then length, then budget."""
    have = {(r["family"], r["length"], r["budget"]) for r in rows if r["budget"] is not None}
    cols = sorted((c for c in have if budgets is None or c[2] in budgets),
                  key=lambda c: (FAMILIES.index(c[0]) if c[0] in FAMILIES else 9, c[0], c[1], c[2]))
    return cols


def scores_table(rows: Sequence[dict], budgets: Sequence[int] | None = None) -> str:
    """One line per method: mean score (x100) per (family, length, budget); the full cache's own line."""
    cols = columns(rows, budgets)
    cell: dict = defaultdict(list)
    for r in rows:
        if r.get("score") is None:
            continue
        if r["method"] == "full":
            for c in cols:
                if c[:2] == (r["family"], r["length"]):
                    cell[("full", c)].append(r["score"])
        else:
            cell[(_short(r["method"]), (r["family"], r["length"], r["budget"]))].append(r["score"])
    methods = sorted({m for m, _ in cell}, key=lambda m: (m != "full", m != "lookahead", m))
    head = "| method | " + " | ".join(f"{f} {length // 1024}K B={b}" for f, length, b in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for m in methods:
        vals = [cell.get((m, c), []) for c in cols]
        lines.append(f"| {m} | " + " | ".join(f"{100 * sum(v) / len(v):.1f}" if v else "–" for v in vals) + " |")
    return "\n".join(lines)


def paired_table(rows: Sequence[dict], method: str = "lookahead", family: str = "ruler",
                 budgets: Sequence[int] | None = None) -> str:
    """`method` minus each other evicting method on `family`'s mean, paired by sample and budget (x100)."""
    by: dict = defaultdict(dict)
    for r in rows:
        if r["family"] == family and r["budget"] is not None and r.get("score") is not None:
            by[(r["length"], r["budget"], r["sample"])][_short(r["method"])] = r["score"]
    diffs: dict = defaultdict(list)
    for (length, budget, _), per in by.items():
        if method in per and (budgets is None or budget in budgets):
            for other, v in per.items():
                if other != method:
                    diffs[(other, length, budget)].append(per[method] - v)
    cols = sorted({(length, b) for _, length, b in diffs})
    lines = [f"| {method} minus | " + " | ".join(f"{family} {length // 1024}K B={b}" for length, b in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for other in sorted({o for o, _, _ in diffs}):
        cells = []
        for length, b in cols:
            m, ci = mean_ci(diffs.get((other, length, b), []))
            cells.append("–" if m != m else f"{100 * m:+.1f}" + ("" if ci != ci else f" ± {100 * ci:.1f}"))
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_line(module: Path) -> str:
    """The module's training cost, as its lookahead.json states it."""
    meta = json.loads((module / "lookahead.json").read_text())
    t = meta.get("training", {})
    cost = t.get("cost")
    if not cost:
        return f"Module `{module.name}`: no training cost recorded in its lookahead.json."
    stopped = " (stopped by its time limit)" if t.get("optimisation", {}).get("stopped_by_time_limit") else ""
    return (f"Module `{module.name}` ({meta.get('dtype')}): trained in {cost['total_s']:.0f} s on "
            f"{cost['hardware']} ({cost['targets_s']:.0f} s collecting targets for {cost['prompts_with_targets']} "
            f"prompts, {cost['training_s']:.0f} s training, {cost['steps']} steps on {cost['prompts_trained']} "
            f"prompts){stopped}.")


def render(rows: Sequence[dict], module: Path | None, budgets: Sequence[int] | None) -> str:
    rows = shared_samples(rows)
    if not rows:
        return "not measured yet"
    samples = defaultdict(set)
    for r in rows:
        samples[(r["task"], r["length"])].add(r["sample"])
    n = sorted({len(v) for v in samples.values()})
    count = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    parts = [f"Mean score (x100) of {rows[0]['model']}; {count} samples per task and length, the ones every "
             "method has.", "",
             scores_table(rows, budgets), "", "Paired differences (mean ± 95% CI, x100):", "",
             paired_table(rows, budgets=budgets)]
    if module is not None:
        parts += ["", cost_line(module)]
    return "\n".join(parts)


def replace(readme: str, key: str, text: str) -> str:
    pattern = re.compile(rf"(<!-- results:{re.escape(key)} -->\n).*?(\n<!-- /results:{re.escape(key)} -->)", re.S)
    if not pattern.search(readme):
        raise SystemExit(f"no <!-- results:{key} --> ... <!-- /results:{key} --> block in the README")
    return pattern.sub(lambda m: m.group(1) + text + m.group(2), readme)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="*", type=Path)
    ap.add_argument("--module", type=Path)
    ap.add_argument("--budgets", help="comma-separated (default: every budget in the rows)")
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--key", help="the README block to fill")
    a = ap.parse_args(argv)
    rows = [r for p in a.rows if p.exists() for r in read_rows(p)]
    budgets = [int(b) for b in a.budgets.split(",")] if a.budgets else None
    text = render(rows, a.module, budgets)
    if a.readme is None:
        print(text)
        return
    a.readme.write_text(replace(a.readme.read_text(encoding="utf-8"), a.key, text), encoding="utf-8")
    print(f"{a.readme}: block {a.key} filled from {len(rows)} rows")


if __name__ == "__main__":
    main()
