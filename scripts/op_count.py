"""Counting the operations a block of torch code dispatches (kernel launches on a GPU, metadata-only views
apart), for the scripts that measure launch counts on the CPU (adapter_ops.py, trainer_ops.py)."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"aten.view", "aten.slice", "aten.expand", "aten.t", "aten._unsafe_view", "aten.permute", "aten.transpose",
         "aten.split_with_sizes", "aten.split", "aten.alias", "aten.select", "aten.unsqueeze", "aten.squeeze",
         "aten.as_strided", "aten.detach"}  # no kernel: metadata only


class Count(TorchDispatchMode):
    """Inside `with Count() as c:`, c.ops counts every dispatched aten operation by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> Counter:
        """The operations that launch a kernel (views left out)."""
        return Counter({k: v for k, v in self.ops.items() if k not in VIEWS})
