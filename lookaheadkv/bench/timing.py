"""Timing helpers: device synchronisation around host clocks, CUDA events for short device work, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a host clock read after it covers that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Host clock with device synchronisation at every read: `lap()` returns seconds since the last read."""

    def __init__(self, device: torch.device | str):
        self.device = device
        sync(device)
        self.t = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        out, self.t = now - self.t, now
        return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_calls(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn, each timed alone (CUDA events on a GPU, a synchronised host clock otherwise)."""
    for _ in range(warmup):
        fn()
    out = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            clock = Clock(device)
            fn()
            out.append(clock.lap())
    return out


def reset_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device | str) -> int | None:
    """Peak bytes allocated on the device since the last reset_peak (None on the CPU: not tracked)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
