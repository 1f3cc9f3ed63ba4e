"""Timing helpers: device synchronisation around host clocks, CUDA events for short device work, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

# One device, or every device of a model spread over several (a device map: models.devices)
Devices = torch.device | str | Sequence[torch.device]


def _cuda(device: Devices) -> list[torch.device]:
    many = [device] if isinstance(device, (torch.device, str)) else list(device)
    return [d for d in map(torch.device, many) if d.type == "cuda"]


def sync(device: Devices) -> None:
    """Wait for the device's (devices') queued work, so a host clock read after it covers that work."""
    for d in _cuda(device):
        torch.cuda.synchronize(d)


class Clock:
    """Host clock with device synchronisation at every read: `lap()` returns seconds since the last read."""

    def __init__(self, device: Devices):
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


def time_calls(fn: Callable[[], object], device: Devices, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn, each timed alone (CUDA events on one GPU, a synchronised host clock otherwise,
    several GPUs included)."""
    for _ in range(warmup):
        fn()
    out = []
    cuda = len(_cuda(device)) == 1
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


def reset_peak(device: Devices) -> None:
    for d in _cuda(device):
        torch.cuda.reset_peak_memory_stats(d)


def peak_bytes(device: Devices) -> int | None:
    """Peak bytes allocated on the device since the last reset_peak, summed over the devices (None on the CPU:
    not tracked)."""
    cuda = _cuda(device)
    return sum(int(torch.cuda.max_memory_allocated(d)) for d in cuda) if cuda else None
