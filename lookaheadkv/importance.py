"""True importance and importance recall: how well a method keeps what the answer will attend to.

True importance (LookaheadKV paper): for a response Y to a prompt X, the mean over Y's query rows of the
softmax attention onto X's keys, per layer and head. We get it exactly like any glimpse: run Y's tokens
after the cached prompt and record their rows, so prompt x prompt attention is never built.
"""

from __future__ import annotations

import torch

from .prefill import Prefill, attend_rows
from .scoring import reduce_gqa


def true_importance(model, pf: Prefill, response_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [B, Hq, L]: the response rows' mean attention onto the prompt (cache left unchanged)."""
    return attend_rows(model, pf, input_ids=response_ids.to(pf.input_ids.device)).mean()


def importance_recall(truth: list[torch.Tensor], kept: list[torch.Tensor | None], budget: int, n_kv_heads: int,
                      valid: torch.Tensor | None = None) -> float:
    """Share of the true top-`budget` prompt positions (per layer and KV head, query heads averaged onto
    their KV head) that `kept` holds, averaged over layers, KV heads and the batch. None keeps all."""
    shares = []
    for t, k in zip(truth, kept):
        t = reduce_gqa(t.float(), n_kv_heads, "mean")
        if valid is not None:
            t = t.masked_fill(~valid[:, None, :], float("-inf"))
        top = t.topk(min(budget, t.shape[-1]), dim=-1).indices
        if k is None:
            shares.append(torch.ones(top.shape[:2]))
            continue
        hit = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, k, True)
        shares.append(hit.gather(-1, top).float().mean(dim=-1).cpu())
    return float(torch.stack(shares).mean())


def recall_per_sequence(truth: torch.Tensor, kept: list[torch.Tensor | None], budget: int, n_kv_heads: int,
                        valid: torch.Tensor) -> torch.Tensor:
    """Batched importance recall, one value per sequence: truth [B, layers, Hq, L] (zeros at pads), kept as
    scoring.select returns it, valid [B, L]. A sequence shorter than the budget is scored on its real positions
    only (pads never count as positions the answer needs)."""
    b, layers, hq, length = truth.shape
    t = truth.float().view(b, layers, n_kv_heads, hq // n_kv_heads, length).mean(dim=3)
    t = t.masked_fill(~valid[:, None, None, :], float("-inf"))
    top = t.topk(min(budget, length), dim=-1).indices  # [B, layers, Hkv, k]
    real = valid[:, None, None, :].expand_as(t).gather(-1, top)
    shares = []
    for layer, k in enumerate(kept):
        if k is None:
            shares.append(torch.ones(b, device=truth.device))
            continue
        hit = torch.zeros((b, n_kv_heads, length), dtype=torch.bool, device=truth.device).scatter_(-1, k, True)
        got = hit.gather(-1, top[:, layer]) & real[:, layer]
        shares.append((got.sum(-1).float() / real[:, layer].sum(-1).clamp_min(1)).mean(dim=1))
    return torch.stack(shares).mean(dim=0)
