"""Paired task scores of the 22K-prompt module (its H200 rows in results/eval/, 2026-12-03) against the modules and
methods before it, on the same samples:

    python results/train/smollm2_h200/runs/2026-12-03_ship/paired_eval.py > results/train/smollm2_h200/runs/2026-12-03_ship/paired_eval.md

- the committed rows before this run (commit BEFORE): `lookahead` there is the module shipped before 2026-12-02
  (401 prompts), `laq` LAQ's earlier form;
- the CPU subset of results/eval/cpu_module_2026-12-02/ (first 8 samples of each RULER task at 4K): the module
  shipped on 2026-12-02 (8,697 prompts) and LAQ as its authors' code runs it, there and in laq_4k_more.jsonl.gz
  (more samples a task, the same command with a larger --n) beside this script. The full-cache answers of those CPU runs equal the H200's, so they pair.
"""

import gzip
import json
import subprocess
from pathlib import Path

from lookaheadkv.evaluation.metrics import mean_ci

BEFORE = "4769392"  # the last commit with the earlier rows
here = Path(__file__).parent
root = here.parents[4]
cpu = root / "results/eval/cpu_module_2026-12-02"
KEY = ("task", "length", "sample", "mode")


def load(text: str) -> dict:
    out = {}
    for r in map(json.loads, text.splitlines()):
        method = r["method"].split(":")[0]
        out[(method, r["budget"]) + tuple(r[k] for k in KEY)] = r
    return out


def committed(name: str) -> dict:
    return load(gzip.decompress(subprocess.run(["git", "show", f"{BEFORE}:results/eval/{name}"], cwd=root,
                                               capture_output=True, check=True).stdout).decode())


def local(path: Path) -> dict:
    return load(gzip.decompress(path.read_bytes()).decode())


def scores(rows: dict, method: str, budget, family: str | None = None) -> dict:
    return {k[2:]: r["score"] for k, r in rows.items() if k[0] == method and k[1] == budget
            and (family is None or r["family"] == family)}


def paired(a: dict, b: dict) -> tuple[int, float, float, float, float]:
    keys = sorted(set(a) & set(b))
    d, ci = mean_ci([a[k] - b[k] for k in keys])
    return len(keys), 100 * sum(a[k] for k in keys) / len(keys), 100 * sum(b[k] for k in keys) / len(keys), 100 * d, 100 * ci


def table(title: str, new: dict, others: dict, budgets, family: str) -> list[str]:
    lines = [f"### {title}", "", "| B | n | 22K module | vs | its score | 22K minus it (paired 95%) |", "|---|---|---|---|---|---|"]
    for b in budgets:
        mine = scores(new, "lookahead", b, family)
        for label, (rows, method) in others.items():
            theirs = scores(rows, method, b if method != "full" else None, family)
            n, x, y, d, ci = paired(mine, theirs)
            lines.append(f"| {b} | {n} | {x:.1f} | {label} | {y:.1f} | {d:+.1f} ± {ci:.1f} |")
    return lines + [""]


def main() -> None:
    out = ["# The 22K-prompt module on the evaluation, paired with what came before", "",
           "Cells in percent (RULER string match, QA token F1, fidelity ROUGE-L against the full cache's output).", ""]
    for name, length, fams in (("smollm2_4k.jsonl.gz", "4K", ("ruler", "qa")),
                               ("smollm2_fidelity_4k.jsonl.gz", "4K", ("fidelity",)),
                               ("smollm2_8k.jsonl.gz", "8K", ("ruler",))):
        new, old = local(root / "results/eval" / name), committed(name)
        for fam in fams:
            others = {"module before 2026-12-02 (401 prompts)": (old, "lookahead"), "laq, earlier form": (old, "laq"),
                      "full cache": (old, "full")}
            out += table(f"{fam} at {length}, all samples (H200 rows)", new, others, (32, 64, 128, 256, 512), fam)
    new = local(root / "results/eval/smollm2_4k.jsonl.gz")
    subset = {"module of 2026-12-02 (8,697 prompts; CPU)": (local(cpu / "new_module_4k.jsonl.gz"), "lookahead"),
              "laq, authors' form (CPU)": (local(cpu / "laq_4k.jsonl.gz"), "laq")}
    out += table("RULER at 4K, the CPU subset (8 samples a task)", new, subset, (64, 128), "ruler")
    wider = here / "laq_4k_more.jsonl.gz"
    if wider.exists():
        more = local(wider)
        per_task = len({k[4] for k in more if k[0] == "laq"}) // len({k[2] for k in more if k[0] == "laq"})
        out += table(f"RULER at 4K, the first {per_task} samples of each task", new,
                     {"laq, authors' form (CPU)": (more, "laq"), "full cache (CPU)": (more, "full")}, (64, 128),
                     "ruler")
    print("\n".join(out))


if __name__ == "__main__":
    main()
