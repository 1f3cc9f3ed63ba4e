"""`lookahead:share=S` on RULER 4K (the first 8 samples of each task, CPU), paired with the default lookahead (CPU
rows of ../cpu_lookahead_options_2026-12-07/, the same samples) and with LAQ's committed H200 rows:

    cd results/eval/cpu_share_2026-12-08 && python paired.py > paired.md
"""

from collections import Counter
from pathlib import Path

from lookaheadkv.evaluation.report import paired_table, table
from lookaheadkv.evaluation.runner import read_rows

here = Path(__file__).parent
root = here.parents[2]


def main() -> None:
    share = list(read_rows(here / "rows_4k.jsonl.gz"))
    samples = {r["sample"] for r in share}
    default = [r for r in read_rows(root / "results/eval/cpu_lookahead_options_2026-12-07/rows_4k.jsonl.gz")
               if r["sample"] in samples and r["method"] == "lookahead"]
    committed = [r for r in read_rows(root / "results/eval/smollm2_4k.jsonl.gz") if r["sample"] in samples]
    full = {r["sample"]: r["answer"] for r in committed if r["method"] == "full"}
    same = [full.get(r["sample"]) == r["answer"] for r in share if r["method"] == "full"]
    laq = [r for r in committed if r["method"] == "laq" and r["budget"] in (64, 128)]
    rows = share + default + laq
    variants = sorted({r["method"] for r in share if r["method"].startswith("lookahead:")})
    print("# LookaheadKV's scores shared over heads (`lookahead:share=S`) on RULER 4K, paired (CPU, 2026-12-08)\n")
    per_task = Counter(r["task"] for r in share if r["method"] == "full")
    print(f"{len(samples)} samples (the first {max(per_task.values())} of {len(per_task)} of RULER's 13 tasks at 4K, "
          f"test split: the run was stopped there), "
          f"SmolLM2-135M-Instruct, fp32, query-aware, the shipped module (2026-12-03). `full` answers identical to "
          f"the committed H200 rows: {sum(same)} of {len(same)}. `lookahead`: the default's CPU rows of the same "
          f"samples (../cpu_lookahead_options_2026-12-07/); `laq`: the committed H200 rows (LAQ as its authors' "
          f"code runs it). Cells x100.\n")
    print("## Means (RULER family: the mean of the 13 task means)\n")
    print(table(rows, by="family"), "\n")
    print("## Each variant minus the others, paired by sample (95%)\n")
    for v in variants:
        print(f"### {v}\n")
        print(paired_table(rows, v, by="family"), "\n")
    print("## By task (means)\n")
    print(table(rows, by="task"), "\n")


if __name__ == "__main__":
    main()
