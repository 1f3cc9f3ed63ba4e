"""Paired task scores of the 22K-prompt module (its H200 rows in results/eval/, 2026-12-03) against the modules and
methods before it, on the same samples:

    cd results/train/smollm2_h200/runs/2026-12-03_ship && python paired_eval.py > paired_eval.md

The rows are relabelled by where they come from and handed to the report's own tables (lookaheadkv.evaluation.report:
`paired_table` pairs by sample and budget, `table` gives the means on LAQ's subset; the means on
every sample are results/eval/report.md's):
- the committed rows before this run (commit BEFORE): `lookahead` there is the module shipped before 2026-12-02
  (401 prompts), `laq` LAQ's earlier form;
- the CPU subset of results/eval/cpu_module_2026-12-02/ (first 8 samples of each RULER task at 4K): the module
  shipped on 2026-12-02 (8,697 prompts); LAQ as its authors' code runs it in laq_4k_more.jsonl.gz beside this
  script (more samples a task: the same command with a larger --n). The full-cache answers of those CPU runs equal
  the H200's, so they pair.
"""

import gzip
import json
import subprocess
from pathlib import Path

from lookaheadkv.evaluation.report import paired_table, table
from lookaheadkv.evaluation.runner import read_rows

BEFORE = "4769392"  # the last commit with the earlier rows
here = Path(__file__).parent
root = here.parents[4]
cpu = root / "results/eval/cpu_module_2026-12-02"


def committed(name: str) -> list[dict]:
    data = subprocess.run(["git", "show", f"{BEFORE}:results/eval/{name}"], cwd=root, capture_output=True,
                          check=True).stdout
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()]


def relabel(rows: list[dict], labels: dict[str, str]) -> list[dict]:
    """The rows of the methods in `labels` (base name before any option), renamed."""
    return [dict(r, method=labels[r["method"].split(":")[0]]) for r in rows if r["method"].split(":")[0] in labels]


def main() -> None:
    rows = []
    for name in ("smollm2_4k.jsonl.gz", "smollm2_fidelity_4k.jsonl.gz", "smollm2_8k.jsonl.gz"):
        rows += relabel(list(read_rows(root / "results/eval" / name)), {"lookahead": "lookahead", "full": "full"})
        rows += relabel(committed(name), {"lookahead": "module before 2026-12-02 (401 prompts)",
                                          "laq": "laq, earlier form"})
    cpu_sets = {"module of 2026-12-02 (CPU)": relabel(list(read_rows(cpu / "new_module_4k.jsonl.gz")),
                                                      {"lookahead": "module of 2026-12-02 (CPU)"}),
                "laq, authors' form (CPU)": relabel(list(read_rows(here / "laq_4k_more.jsonl.gz")),
                                                    {"laq": "laq, authors' form (CPU)"})}
    out = ["# The 22K-prompt module on the evaluation, paired with what came before", "",
           "Cells in percent (RULER string match, QA token F1, fidelity ROUGE-L against the full cache's output).", "",
           "## lookahead (the 22K module) minus each, paired by sample and budget (95%); n = pairs", "",
           paired_table(rows + [r for part in cpu_sets.values() for r in part], "lookahead"), ""]
    for label, part in cpu_sets.items():  # the means on each CPU run's samples (RULER 4K, B=64 and 128)
        subset = {r["sample"] for r in part}
        per_task = len(subset) // len({r["task"] for r in part})
        out += [f"## Means on the samples of `{label}` (RULER 4K, the first {per_task} of each task)", "",
                table(part + [r for r in rows if r["sample"] in subset and r["budget"] in (None, 64, 128)
                              and r["method"] in ("full", "lookahead")], "score", "family"), ""]
    print("\n".join(out))

if __name__ == "__main__":
    main()
