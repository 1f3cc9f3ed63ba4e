"""What each process of the torchrun tests runs (tests/test_distributed.py): training on the tiny float64 model,
through the library (the CLI loads models in float32, too coarse to compare runs step for step).

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT [--targets DIR] [--kill-at-step K] [--fit]

--targets DIR: the target store (default OUT/targets).
--kill-at-step K: rank 0 kills itself (SIGKILL) as its K-th training step begins (torchrun then stops the
other ranks), once checkpoints of earlier steps are on disk.
--fit: the schedule fitted to a time limit after 2 steps, each rank's own fit longer by its rank (as if it ran
slower or faster), so the ranks must agree on one horizon.
"""

from __future__ import annotations

import os
import signal
import sys
import types

import torch
from conftest import tiny_model

from lookaheadkv import train as tr

TOK = types.SimpleNamespace(eos_token_id=None)


def prompts(k: int = 11, seed: int = 2, low: int = 20, high: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(low, high, (1,), generator=g)),), generator=g) for _ in range(k)]


def config(**kw) -> tr.TrainConfig:
    """4 prompts a global batch over 9 training prompts: batches of 4, 4 and 1 (the last leaves one of two ranks
    without a prompt), 3 epochs; targets collected in batches of about 4 prompts (several for each rank)."""
    args = dict(samples=11, epochs=3, batch_size=4, lr=1e-2, n=4, rank=4, alpha=8, response_tokens=6,
                val_share=0.3, checkpoint_every=1, evals=2, collect_batch_tokens=200)
    args.update(kw)
    return tr.TrainConfig(**args)


def run(out: str, targets: str | None = None, kill_at: int | None = None, fit: bool = False) -> dict:
    if fit:
        tr.FIT_STEPS = 2
        tr._fitted_horizon = lambda step, total, left_s, step_s: step + 2 + int(os.environ.get("RANK", "0"))
    if kill_at is not None:
        real, calls = tr.batch_loss, {"n": 0}

        def killing(model, mod, targets, grad, **kw):
            if grad:
                calls["n"] += 1
                if calls["n"] == kill_at and int(os.environ.get("RANK", "0")) == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(model, mod, targets, grad, **kw)

        tr.batch_loss = killing
    cfg = config(time_limit=1e6, fit_time_limit=True) if fit else config()
    return tr.train(tiny_model(), TOK, out, cfg, prompt_ids=prompts(), targets_dir=targets, progress=False)


if __name__ == "__main__":
    args = sys.argv[1:]
    def option(name: str) -> str | None:
        return args[args.index(name) + 1] if name in args else None

    kill = option("--kill-at-step")
    run(args[0], option("--targets"), None if kill is None else int(kill), "--fit" in args)
