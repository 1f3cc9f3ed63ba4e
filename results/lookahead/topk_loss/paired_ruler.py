"""RULER 4K (the first 8 samples of each task, CPU) of the two warm-start runs, paired with each other, with the
shipped module's CPU rows of the same samples and with LAQ's committed H200 rows:

    python results/lookahead/topk_loss/paired_ruler.py > results/lookahead/topk_loss/paired_ruler.md
"""

from pathlib import Path

from lookaheadkv.evaluation.report import paired_table, table
from lookaheadkv.evaluation.runner import read_rows

here = Path(__file__).resolve().parent
root = here.parents[2]
NAMES = {"lookahead:module=/tmp/tk/A": "A_kl", "lookahead:module=/tmp/tk/B": "B_kl_topk"}


def main() -> None:
    new = [dict(r, method=NAMES.get(r["method"], r["method"])) for r in read_rows(here / "rows_4k.jsonl.gz")]
    samples = {r["sample"] for r in new}
    options = read_rows(root / "results/eval/cpu_lookahead_options_2026-12-07/rows_4k.jsonl.gz")
    shipped = [r for r in options if r["method"] == "lookahead" and r["sample"] in samples]
    laq = [r for r in read_rows(root / "results/eval/smollm2_4k.jsonl.gz")
           if r["method"] == "laq" and r["budget"] in (64, 128) and r["sample"] in samples]
    rows = [r for r in new if r["method"] != "full"] + [r for r in options if r["method"] == "full"
                                                         and r["sample"] in samples] + shipped + laq
    print("# RULER 4K of the top-k term's warm-start runs, paired (CPU, 2026-12-07)\n")
    print(f"{len(samples)} samples, SmolLM2-135M-Instruct, fp32, query-aware. A_kl: the shipped module + 34 steps of "
          "the KL; B_kl_topk: the same + 0.1 x the top-64 term; lookahead: the shipped module (CPU rows of "
          "../../eval/cpu_lookahead_options_2026-12-07/); laq: committed H200 rows. Cells x100.\n")
    print("## Means (RULER family: the mean of the 13 task means)\n")
    print(table(rows, by="family"), "\n")
    for v in ("B_kl_topk", "A_kl"):
        print(f"## {v} minus the others, paired by sample (95%)\n")
        print(paired_table(rows, v, by="family"), "\n")
    print("## By task (means)\n")
    print(table(rows, by="task"))


if __name__ == "__main__":
    main()
