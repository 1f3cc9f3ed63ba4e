"""LookaheadKV's scoring options on RULER 4K (the first 8 samples of each task, CPU), paired with each other and with
LAQ's committed H200 rows of the same samples:

    cd results/eval/cpu_lookahead_options_2026-12-07 && python paired.py > paired.md

The CPU's `full` and `lookahead` answers equal the committed H200 rows' on every sample (checked below), so the
two machines' rows pair.
"""

from pathlib import Path

from lookaheadkv.evaluation.report import paired_table, table
from lookaheadkv.evaluation.runner import read_rows

here = Path(__file__).parent
root = here.parents[2]


def main() -> None:
    cpu = list(read_rows(here / "rows_4k.jsonl.gz"))
    samples = {r["sample"] for r in cpu}
    committed = [r for r in read_rows(root / "results/eval/smollm2_4k.jsonl.gz") if r["sample"] in samples]
    ours = {(r["sample"], r["method"], r["budget"]): r["answer"] for r in committed}
    same = [ours.get((r["sample"], r["method"], r["budget"])) == r["answer"] for r in cpu
            if r["method"] in ("full", "lookahead")]
    laq = [r for r in committed if r["method"] == "laq" and r["budget"] in (64, 128)]
    rows = cpu + laq
    variants = sorted({r["method"] for r in cpu if r["method"].startswith("lookahead:")})
    print("# LookaheadKV's scoring options on RULER 4K, paired (CPU, 2026-12-07)\n")
    print(f"{len(samples)} samples (the first {len(samples) // 13} of each of RULER's 13 tasks at 4K, test split), "
          f"SmolLM2-135M-Instruct, fp32, query-aware, the shipped module (2026-12-03). `full` and `lookahead` "
          f"answers identical to the committed H200 rows: {sum(same)} of {len(same)}. `laq`: the committed H200 "
          f"rows of the same samples (LAQ as its authors' code runs it). Cells x100.\n")
    print("## Means (RULER family: the mean of the 13 task means)\n")
    print(table(rows, by="family"), "\n")
    print("## Each option minus the default and minus LAQ, paired by sample (95%)\n")
    for v in variants + ["lookahead"]:
        print(f"### {v}\n")
        print(paired_table(rows, v, by="family"), "\n")
    print("## By task (means)\n")
    print(table(rows, by="task"), "\n")
    # the oracle (scripts/oracle_eval.py) on the first 4 samples of each task: what prediction could reach
    oracle = list(read_rows(here / "oracle_4k.jsonl.gz"))
    four = {r["sample"] for r in oracle}
    full = {r["sample"]: r["answer"] for r in cpu if r["method"] == "full"}
    same = sum(full[r["sample"]] == r["answer"] for r in oracle if r["method"] == "full")
    near = [r for r in oracle if r["method"] == "oracle"] + [r for r in rows if r["sample"] in four and (
        r["method"] in ("full", "lookahead", "laq"))]
    print(f"## The oracle: top-B by the full cache's own answer's attention ({len(four)} samples, the first 4 of "
          f"each task; its full-cache answers equal the rows above on {same} of {len(four)})\n")
    print(table(near, by="family"), "\n")
    print(paired_table(near, "oracle", by="family"))


if __name__ == "__main__":
    main()
