"""Score evaluation rows again from their stored answers with today's metrics (runner.rescore), in place.

    python scripts/rescore_eval.py results/eval/smollm2_4k.jsonl.gz results/eval/smollm2_8k.jsonl.gz ...

Nothing is re-run: only score, em and fidelity are recomputed (with the old metrics it rewrites every file
byte for byte). A .gz file is written back gzipped.
"""

import gzip
import json
import sys
from pathlib import Path

from lookaheadkv.evaluation.runner import read_rows, rescore

for name in sys.argv[1:]:
    path = Path(name)
    rows = read_rows(path)
    new = rescore(rows)
    text = "".join(json.dumps(r) + "\n" for r in new).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
    tmp.replace(path)
    print(f"{path}: {len(new)} rows, {sum(a != b for a, b in zip(rows, new))} with a new score, em or fidelity")
