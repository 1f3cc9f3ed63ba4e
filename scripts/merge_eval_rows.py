"""Replace one method's rows in committed evaluation files by the rows of a re-run of that method alone.

    python scripts/merge_eval_rows.py --method lookahead --new NEW.jsonl.gz --into results/eval/smollm2_4k.jsonl.gz

A re-run of `lookahead` with a new module changes only its own rows (every other method's rows and the full
cache's do not depend on the module). The re-run also scores the full cache again, as the reference of its
fidelity: those rows are compared with the committed ones (same sample, same answer expected) and dropped.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--into", type=Path, required=True)
    a = ap.parse_args()
    old, new = read(a.into), read(a.new)
    full_old = {r["sample"]: r.get("answer") for r in old if r["method"] == "full"}
    full_new = {r["sample"]: r.get("answer") for r in new if r["method"] == "full"}
    same = sum(full_old.get(s) == ans for s, ans in full_new.items())
    kept = [r for r in old if r["method"] != a.method]
    added = [r for r in new if r["method"] == a.method]
    tmp = a.into.with_name(a.into.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in kept + added:
            f.write(json.dumps(r) + "\n")
    tmp.replace(a.into)
    print(f"{a.into}: {len(old) - len(kept)} {a.method} rows replaced by {len(added)}; the re-run's full-cache "
          f"answers equal the committed ones on {same} of {len(full_new)} samples")


if __name__ == "__main__":
    main()
