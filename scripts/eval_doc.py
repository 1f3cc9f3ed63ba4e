"""Regenerate docs/eval.md's tables from the committed rows in results/eval/smollm2_*.jsonl.gz
(tests/test_readme.py checks that the committed doc is what this writes)."""

import re
import sys
from pathlib import Path

from lookaheadkv.evaluation.report import shared_samples, table
from lookaheadkv.evaluation.runner import read_rows

root = Path(__file__).resolve().parent.parent
DOC = root / "docs" / "eval.md"


def render(doc: str) -> str:
    """doc with its two tables (score, recall by family) made anew from the committed rows."""
    # the report's samples: those every method of a task has, of the tasks most methods of their family ran
    rows = shared_samples([r for p in sorted((root / "results" / "eval").glob("smollm2_*.jsonl.gz"))
                           for r in read_rows(p)])
    tables = [table(rows, "score", "family"), table(rows, "recall", "family")]
    blocks = list(re.finditer(r"(?m)^\| model \|.*\n(?:^\|.*\n)+", doc))
    if len(blocks) != len(tables):
        sys.exit(f"docs/eval.md has {len(blocks)} tables, expected {len(tables)}")
    for m, t in reversed(list(zip(blocks, tables))):
        doc = doc[: m.start()] + t + "\n" + doc[m.end():]
    return doc


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print("docs/eval.md: tables rewritten")
