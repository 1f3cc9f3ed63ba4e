"""The training step's forward and backward as CUDA graphs: one captured per batch shape (rows, prompt length
rounded up to `bucket`), replayed with each batch copied into that graph's static buffers.

Why: the eager step is bound by the host issuing its operations (~6,800 at batch 16 on SmolLM2: the device was
busy 36% of a step on the H200, results/train/smollm2_h200/bench_2026-12-03/); a replay is one launch.

What a graph holds: the gradients zeroed, train.batch_loss (the prompts' prefill without gradients, the
lookahead pass, the loss), backward, and the gradient clip. Every graph writes the same gradient tensors, made
once before the first capture, so the optimizer (fused AdamW, its float learning rate set by the scheduler as
before) steps eagerly after any of them. A batch is left-padded further to its bucket, which changes no value
(pads take part in no attention and no loss) but lets ~30 graphs cover prompts of up to 8K tokens; the graphs
share one memory pool (they never run at once).

The first batch of each shape is the warm-up: its real step runs eagerly on a side stream (CUDA's advice:
kernels, plans and libraries initialised before capture), then the graph is captured for the next ones. If a
capture fails (an operation that synchronises with the host, or one CUDA graphs cannot hold), the reason is
printed once and every later step runs eagerly, on the same gradient tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import click
import torch

BUCKET = 256  # prompt positions a captured length is rounded up to


class GraphedStep:
    """Zero the gradients, compute `loss_of(batch)` (batch: a train.Batch; padded=True, so no host sync), run its
    backward and clip the gradients to norm 1; through a CUDA graph per batch shape. Returns the loss (its
    own tensor: a graph's output is overwritten by its next replay)."""

    def __init__(self, loss_of: Callable, params: list[torch.nn.Parameter], device: torch.device,
                 bucket: int = BUCKET):  # device: a CUDA one (train() and the CLI refuse others)
        self.loss_of, self.params, self.device, self.bucket = loss_of, params, device, bucket
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        self.pool = None
        self.off: str | None = None  # why capture was given up
        self.captured = self.replayed = 0
        for p in params:  # the static gradients every graph writes and the optimizer reads
            p.grad = torch.zeros_like(p)

    def _step(self, batch) -> torch.Tensor:
        torch._foreach_zero_([p.grad for p in self.params])
        loss = self.loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        return loss

    def _static(self, batch, length: int):
        """Device buffers of the batch's shape at `length` positions."""
        from .train import Batch

        rows, (layers, hq) = batch.ids.shape[0], batch.truth.shape[1:3]
        return Batch(torch.zeros((rows, length), dtype=batch.ids.dtype, device=self.device),
                     torch.zeros((rows, length), dtype=batch.mask.dtype, device=self.device),
                     torch.zeros((rows, layers, hq, length), dtype=batch.truth.dtype, device=self.device))

    @staticmethod
    def _fill(static, batch) -> None:
        """The batch into the static buffers, left-padded to their length (pads: token 0, mask 0, truth 0)."""
        pad = static.ids.shape[1] - batch.ids.shape[1]
        for dst, src in ((static.ids, batch.ids), (static.mask, batch.mask), (static.truth, batch.truth)):
            dst[..., :pad].zero_()
            dst[..., pad:].copy_(src, non_blocking=True)

    def __call__(self, batch) -> torch.Tensor:
        if self.off is not None:
            return self._step(batch).detach()
        length = -(-batch.ids.shape[1] // self.bucket) * self.bucket
        key = (batch.ids.shape[0], length)
        if key in self.graphs:
            graph, static, out = self.graphs[key]
            self._fill(static, batch)
            graph.replay()
            self.replayed += 1
            return out.detach().clone()
        static = self._static(batch, length)
        self._fill(static, batch)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # this batch's real step, the warm-up of its graph
            loss = self._step(static).detach()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._step(static)
        except Exception as e:  # noqa: BLE001 - any failure to capture falls back to eager steps
            self.off = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            torch.cuda.synchronize(self.device)
            click.echo(f"--cuda-graphs: capture failed ({self.off}); training on eagerly", err=True)
            return loss
        self.pool = self.pool or graph.pool()
        self.graphs[key] = (graph, static, out)
        self.captured += 1
        return loss

    def report(self) -> dict:
        return {"captured": self.captured, "replayed": self.replayed, "bucket": self.bucket,
                **({"gave_up": self.off} if self.off else {})}
