"""Evaluation over several processes (torchrun): each rank writes its rows to a part file of its own beside
--out F (`F.rank<r>.part`), and rank 0 merges the parts into F when every rank is done, in the order one
process writes them. A run interrupted before the merge leaves part files; the next run (any number of
processes, or one) merges them into F first, so their rows count as done.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import distributed

RowOrder = Callable[[dict], tuple]


def part_path(out: str | Path, rank: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}.part")


def part_files(out: str | Path) -> list[Path]:
    out = Path(out)
    return sorted(out.parent.glob(glob.escape(out.name) + ".rank*.part"))


def merge_parts(out: str | Path, order: RowOrder) -> int:
    """Append the part files' rows that F lacks to F, sorted by `order` (stable), then delete the parts.
    Returns the rows appended. Safe to repeat after an interruption: rows already in F are never added twice."""
    from .runner import Sink, read_rows, row_key

    parts = part_files(out)
    if not parts:
        return 0
    have = {row_key(r) for r in read_rows(out)}
    new: dict[tuple, dict] = {}
    for p in parts:
        for r in read_rows(p):
            if row_key(r) not in have:
                new.setdefault(row_key(r), r)
    sink = Sink(out)
    try:
        for r in sorted(new.values(), key=order):
            sink.write(r)
        if sink.f is not None:
            os.fsync(sink.f.fileno())  # on disk before the parts go
    finally:
        sink.close()
    for p in parts:
        p.unlink()
    return len(new)


def plan_order(model: str, names: Sequence[str], length: int, seed: int, mode: str, batch: int,
               pairs: Sequence[tuple[str, int | None]]) -> RowOrder:
    """Sort key giving rows the place one process writes them in: batch of samples, task (round-robin), sample,
    then full cache first and the methods x budgets as given. Rows of another run's options sort last (stable)."""
    from .runner import sample_id

    task_at = {t: i for i, t in enumerate(names)}
    pair_at = {p: i for i, p in enumerate(pairs)}

    def key(row: dict) -> tuple:
        try:
            i = int(str(row["sample"]).rsplit("-", 1)[1])
            ours = (row["model"] == model and row["length"] == length and row["mode"] == mode
                    and row["sample"] == sample_id(row["task"], length, seed, i))
            if ours:
                return (0, i // batch, task_at[row["task"]], i, pair_at[(row["method"], row["budget"])])
        except (KeyError, ValueError, IndexError, TypeError):
            pass
        return (1,)

    return key


def start(out: str | Path | None, order: RowOrder) -> None:
    """Before a run reads F: rank 0 merges what an interrupted sharded run left; the others wait for it."""
    if out is not None and distributed.is_main():
        merge_parts(out, order)
    distributed.barrier()


def finish(out: str | Path | None, rows: list[dict], order: RowOrder) -> list[dict]:
    """After every rank's last batch: rank 0 merges the parts into F; every rank gets all new rows, in order."""
    gathered = distributed.gather(rows)  # also waits for every rank
    if out is not None and distributed.is_main():
        merge_parts(out, order)
    distributed.barrier()
    return sorted((r for part in gathered for r in part), key=order)
