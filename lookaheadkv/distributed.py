"""Several processes under torchrun: who this process is, its share of the work, and the few collectives the
trainer, the target collection and the evaluation need.

Without torchrun (no WORLD_SIZE, or 1) every function here is the identity of one process: nothing is
initialised, shard() returns everything, gather() returns [obj], barrier() returns at once.

Under torchrun the default process group is NCCL when this process computes on CUDA, gloo otherwise (DDP
uses it); control messages (barriers, Python objects, stop flags) go over a second, gloo group on the CPU, so
they never make a GPU stream wait and never need a device tensor.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch

from .errors import LookaheadKVError

T = TypeVar("T")
# Barriers wait for the slowest rank (collection and evaluation shards finish at different times): generous.
TIMEOUT_S = float(os.environ.get("LOOKAHEADKV_DIST_TIMEOUT_S", 4 * 3600))
_CONTROL = None  # the gloo group for control messages


def world() -> int:
    """Processes in this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if world() > 1 else 0


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, modules, merged results and prints."""
    return rank() == 0


def device_for(device: str) -> str:
    """The device this process computes on: under torchrun `cuda` becomes cuda:LOCAL_RANK (one GPU a process);
    a fixed index is refused there, since every process would take the same GPU."""
    if world() == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise LookaheadKVError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; give --device "
                               "cuda (restrict the GPUs with CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world()))
    if local_world > count:
        raise LookaheadKVError(f"torchrun started {local_world} processes on this node but it has {count} CUDA "
                               "device(s); give --nproc-per-node at most the number of GPUs")
    return f"cuda:{local_rank()}"


def ensure(device: torch.device | str = "cpu") -> None:
    """Join the process group (once; a no-op without torchrun). `device`: where this process computes."""
    global _CONTROL
    if world() == 1 or _CONTROL is not None:
        return
    device = torch.device(device)
    timeout = timedelta(seconds=TIMEOUT_S)
    if not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            torch.distributed.init_process_group("gloo", timeout=timeout)
        atexit.register(_shutdown)
    gloo = torch.distributed.get_backend() == "gloo"
    _CONTROL = torch.distributed.group.WORLD if gloo else torch.distributed.new_group(backend="gloo",
                                                                                        timeout=timeout)


def _shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _control():
    if _CONTROL is None:
        ensure("cpu")
    return _CONTROL


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: every world()-th item from its rank on (interleaved, so neighbours in a list
    sorted by cost spread over the ranks)."""
    return list(items[rank()::world()])


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier(group=_control())


def gather(obj: T) -> list[T]:
    """Every rank's obj, in rank order, on every rank (picklable Python objects)."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    torch.distributed.all_gather_object(out, obj, group=_control())
    return out


def any_rank(flag: bool) -> bool:
    """Whether any rank says True (e.g. a time limit: every rank must stop at the same step)."""
    if world() == 1:
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_control())
    return bool(t.item())


def sum_cpu(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks of a CPU tensor."""
    if world() == 1:
        return values
    out = values.clone()
    torch.distributed.all_reduce(out, group=_control())
    return out
