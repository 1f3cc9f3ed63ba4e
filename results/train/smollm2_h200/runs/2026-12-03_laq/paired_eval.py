"""Paired task scores of lookahead (the shipped 22K-prompt module) against LAQ as its authors' code runs it, both
from the H200 (results/eval/, LAQ's rows from this run, 2026-12-03), on the same samples:

    cd results/train/smollm2_h200/runs/2026-12-03_laq && python paired_eval.py > paired_eval.md

Also: how LAQ's H200 rows (bf16) compare with its CPU rows (fp32) on the 208 samples of
../2026-12-03_ship/laq_4k_more.jsonl.gz that judged issue 11's target before this run.
"""

from pathlib import Path

from lookaheadkv.evaluation.report import paired_table, table
from lookaheadkv.evaluation.runner import read_rows

here = Path(__file__).parent
root = here.parents[4]
FILES = ("smollm2_4k.jsonl.gz", "smollm2_8k.jsonl.gz", "smollm2_fidelity_4k.jsonl.gz")


def main() -> None:
    rows = [r for name in FILES for r in read_rows(root / "results/eval" / name)
            if r["method"].split(":")[0] in ("full", "lookahead", "laq")]
    cpu = [r for r in read_rows(here.parent / "2026-12-03_ship/laq_4k_more.jsonl.gz") if r["method"] == "laq"]
    gpu = {(r["sample"], r["budget"]): r["score"] for r in rows if r["method"] == "laq" and r["task"] != "qa"}
    pairs = [(gpu[(r["sample"], r["budget"])], r["score"]) for r in cpu if (r["sample"], r["budget"]) in gpu]
    same = sum(a == b for a, b in pairs)
    mean = [sum(x) / len(pairs) for x in zip(*pairs)] if pairs else [float("nan")] * 2
    subset = {r["sample"] for r in cpu}
    out = ["# lookahead against LAQ (authors' form), both on the H200", "",
           "Cells in percent (RULER string match, QA token F1, fidelity ROUGE-L against the full cache's output).", "",
           "## lookahead minus each, paired by sample and budget (95%); n = pairs", "",
           paired_table(rows, "lookahead"), "",
           f"## LAQ on the H200 (bf16) and on the CPU (fp32), the {len(subset)} RULER 4K samples of the CPU run", "",
           f"{len(pairs)} sample x budget pairs: the same score in {same} ({100 * same / max(1, len(pairs)):.1f}%); "
           f"mean {100 * mean[0]:.1f} on the H200, {100 * mean[1]:.1f} on the CPU.", "",
           table([r for r in rows if r["sample"] in subset and r["budget"] in (None, 64, 128)], "score", "family"), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
