"""CPU side, after a lease: what scripts/gpu/collect_out.sh brought back, into the repository.

    python scripts/gpu/unpack.py FILES_AT [--root .]

- NAME.partNN files are joined first;
- rows.tgz: every evaluation file is merged into results/eval/NAME.jsonl.gz, so leases add to one data set (the
  next lease resumes from the tree). The eval lane's files first: that lane ran the methods of the module it just
  trained anew and carries every other row it started from, so its rows replace those of the same key and a method
  it carries loses the rows it does not (the old module's, which a row key naming no module cannot tell apart).
  Then the compare lane's: union by row key, rows already there first;
- results.tgz: each model's logs, train logs, recall and trainer benchmark into results/train/MODEL_CARD/, its
  cost benchmark (`cost/`) into results/bench/MODEL_CARD/ (`python -m lookaheadkv.bench.report` writes the tables;
  SmolLM2's folders are smollm2_CARD);
  CARD is the GPU its gpu.txt names (h100, h200). `--run NAME` puts them under MODEL_CARD/runs/NAME/ instead; a file
  already there with other contents is never overwritten (it stops, asking for --run);
- module-MODEL.tar: the bf16 module into lookaheadkv/modules/MODEL/, where it is found by the model's identity.
Prints what it wrote; nothing is deleted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

ROW_KEY = ("model", "task", "length", "sample", "mode", "method", "budget")  # lookaheadkv.evaluation.runner's


def join_parts(folder: Path, into: Path) -> list[Path]:
    """The files of `folder`, NAME.partNN joined into NAME, copied to `into`."""
    into.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if ".part" in f.name and f.name.rsplit(".part", 1)[1].isdigit():
            parts.setdefault(f.name.rsplit(".part", 1)[0], []).append(f)
        elif f.is_file():
            shutil.copy(f, into / f.name)
    for name, group in parts.items():
        with open(into / name, "wb") as out:
            for p in group:
                out.write(p.read_bytes())
    return sorted(into.iterdir())


def read_jsonl(data: bytes, gz: bool) -> list[dict]:
    text = gzip.decompress(data).decode() if gz else data.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def merge_rows(dest: Path, new: list[dict], fresh: bool = False) -> int:
    """Union of dest's rows and `new` by row key, written gzipped; returns the rows added. `fresh` (the eval
    lane's rows): `new` replaces dest's rows of its methods instead."""
    old = read_jsonl(dest.read_bytes(), True) if dest.exists() else []
    if fresh:
        methods = {r.get("method") for r in new}
        old = [r for r in old if r.get("method") not in methods]
    seen = {tuple(r.get(k) for k in ROW_KEY) for r in old}
    added = []
    for r in new:
        key = tuple(r.get(k) for k in ROW_KEY)
        if key not in seen:
            seen.add(key)
            added.append(r)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in old + added:
            f.write(json.dumps(r) + "\n")
    tmp.replace(dest)
    return len(added)


# Results folders named before this script: SmolLM2's are results/{train,bench}/smollm2_CARD/
FOLDER = {"smollm2-135m-instruct": "smollm2"}


def card(name: str) -> str:
    """'h100' from gpu.txt's 'NVIDIA H100 80GB HBM3, ...' (any GPU: its model word, lower case)."""
    words = name.replace(",", " ").split()
    return next((w.lower() for w in words if any(c.isdigit() for c in w)), "gpu")


def unpack(files_at: Path, root: Path, run: str | None = None) -> list[str]:
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in join_parts(files_at, Path(tmp)):
            if f.name == "rows.tgz":
                with tarfile.open(f) as tar:
                    files = [m for m in tar.getmembers() if m.isfile() and m.name.endswith((".jsonl", ".jsonl.gz"))]
                    from_eval = {m.name: Path(m.name).parent.name == "eval" for m in files}  # the lane a file is from
                    for m in sorted(files, key=lambda m: not from_eval[m.name]):  # the eval lane's first
                        name = Path(m.name).name
                        rows = read_jsonl(tar.extractfile(m).read(), name.endswith(".gz"))
                        stem = name.removesuffix(".gz").removesuffix(".jsonl")
                        dest = root / "results" / "eval" / f"{stem}.jsonl.gz"
                        added = merge_rows(dest, rows, fresh=from_eval[m.name])
                        done.append(f"{dest}: {added} rows added from {m.name}")
            elif f.name == "results.tgz":
                with tarfile.open(f) as tar:
                    members = [m for m in tar.getmembers() if m.isfile() and len(Path(m.name).parts) >= 3
                               and not m.name.endswith(".done")]  # MODEL/results/...
                    cards = {Path(m.name).parts[0]: card(tar.extractfile(m).read().decode())
                             for m in members if Path(m.name).parts[2:] == ("gpu.txt",)}
                    writes = []
                    for m in members:
                        model, _, *rest = Path(m.name).parts
                        kind = "bench" if rest[0] == "cost" else "train"
                        rest = rest[1:] if kind == "bench" else rest
                        dest = root / "results" / kind / f"{FOLDER.get(model, model)}_{cards.get(model, 'gpu')}"
                        dest = (dest / "runs" / run if run else dest) / Path(*rest)
                        data = tar.extractfile(m).read()
                        if dest.exists() and dest.read_bytes() != data:
                            raise SystemExit(f"unpack: {dest} exists with other contents; give --run NAME "
                                             "to put this lease's files in a folder of their own")
                        writes.append((dest, data))
                    for dest, data in writes:  # only once nothing would be overwritten
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(data)
                        done.append(str(dest))
            elif f.name.startswith("module-") and f.name.endswith(".tar"):
                model = f.name.removeprefix("module-").removesuffix(".tar")
                dest = root / "lookaheadkv" / "modules" / model
                with tarfile.open(f) as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            out = dest / Path(m.name).name
                            out.parent.mkdir(parents=True, exist_ok=True)
                            out.write_bytes(tar.extractfile(m).read())
                done.append(f"{dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
            elif f.name == "status.txt":
                done.append(f.read_text().rstrip())
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files_at", type=Path)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--run", help="put logs and benchmarks under MODEL_CARD/runs/RUN/ (e.g. a date)")
    a = ap.parse_args(argv)
    for line in unpack(a.files_at, a.root, a.run):
        print(line)


if __name__ == "__main__":
    main()
