"""Pack files for the GPU machine into device calls that each stay under the carry limit.

A call carries the working tree (tracked and untracked-not-ignored files) plus the paths it names, 64 MiB in all,
at most 8 paths. `python scripts/gpu/plan_calls.py FILE...` prints one line per call: the JSON carry list (each
call also names .whl and every manifest, `chunks.sha256`, of the models whose chunks it brings). Large files
first, each into the first call with room (first-fit decreasing), so the number of calls stays near the least.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20
LIMIT = 64 * MIB  # the device tool's limit on what one call carries, tree included
MAX_PATHS = 8


def tree_bytes(root: Path) -> int:
    """Bytes of what travels with every call: tracked files and untracked ones that git does not ignore."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def companions(path: str) -> list[str]:
    """What must ride with a file: a model chunk's manifest (the GPU side checks each chunk against it)."""
    manifest = Path(path).parent / "chunks.sha256"
    return [str(manifest)] if Path(path).name.startswith("chunk.") and manifest.is_file() else []


def plan(files: dict[str, int], room: int, always: dict[str, int], max_paths: int = MAX_PATHS) -> list[list[str]]:
    """Calls (lists of paths) holding every file of `files` ({path: bytes}) once, each call within `room` bytes
    with `always` (carried by every call) and its files' companions counted, at most `max_paths` paths."""
    def size(p: str) -> int:
        return files[p] if p in files else Path(p).stat().st_size

    fixed, calls = sum(always.values()), []
    for path in sorted(files, key=lambda p: (-files[p], p)):
        for call in calls:
            new = [c for c in companions(path) if c not in call] + [path]
            if fixed + sum(map(size, call + new)) <= room and len(always) + len(call) + len(new) <= max_paths:
                call += new
                break
        else:
            new = companions(path) + [path]
            if fixed + sum(map(size, new)) > room:
                raise SystemExit(f"{path} ({files[path] / MIB:.1f} MiB) does not fit a call: {room / MIB:.1f} MiB "
                                 "are left beside the tree; split it smaller (CHUNK_MIB=...)")
            calls.append(new)
    return [list(always) + sorted(c, key=lambda p: (not p.endswith("chunks.sha256"), p)) for c in calls]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--root", default=".", help="the checkout the calls are made from")
    ap.add_argument("--margin-mib", type=float, default=1.0, help="kept free in every call")
    ap.add_argument("--room", action="store_true", help="print the whole MiB a file may have beside the tree")
    a = ap.parse_args(argv)
    tree = tree_bytes(Path(a.root))
    always = {p: sum(f.stat().st_size for f in Path(p).glob("*")) for p in [".whl"] if Path(p).is_dir()}
    room = LIMIT - tree - int(a.margin_mib * MIB)
    if a.room:
        print(int((room - sum(always.values()) - 64 * 1024) // MIB))  # 64 KiB: a manifest beside the chunk
        return
    calls = plan({f: Path(f).stat().st_size for f in a.files}, room, always)
    print(f"# tree {tree / MIB:.1f} MiB, {room / MIB:.1f} MiB left a call; {len(calls)} calls", file=sys.stderr)
    for c in calls:
        print(json.dumps(c))


if __name__ == "__main__":
    main()
