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


def recall_per_sequence(truth: list[torch.Tensor], kept: list[torch.Tensor | None], budget: int, n_kv_heads: int,
                        valid: torch.Tensor | None = None, top_cache: dict | None = None) -> torch.Tensor:
    """[B]: per sequence, the share of its true top-`budget` prompt positions (per layer and KV head, query heads
    averaged onto their KV head) that `kept` holds, averaged over layers and KV heads. truth: per layer
    [B, Hq, L]; kept: per layer [B, Hkv, k], None keeps all; valid [B, L]: real positions. A sequence with
    fewer real positions than the budget is judged on all of them (pads are never part of its truth).
    top_cache, shared by the calls for one truth, holds each budget's true top positions."""
    shares = []
    for li, (t, k) in enumerate(zip(truth, kept)):
        length = t.shape[-1]
        cached = None if top_cache is None else top_cache.get((budget, li))
        if cached is None:
            t = reduce_gqa(t.float(), n_kv_heads, "mean")
            v = None if valid is None else valid.to(t.device)  # a layer's tensors live on its device (device map)
            if v is not None:
                t = t.masked_fill(~v[:, None, :], float("-inf"))
            top = t.topk(min(budget, length), dim=-1).indices  # real positions first: they score above -inf
            real = (torch.ones_like(top, dtype=torch.bool) if v is None
                    else v[:, None, :].expand(-1, top.shape[1], -1).gather(-1, top))
            cached = (top, real)
            if top_cache is not None:
                top_cache[(budget, li)] = cached
        top, real = cached
        if k is None:
            shares.append(torch.ones(top.shape[:2], device=top.device))
            continue
        hit = torch.zeros(*top.shape[:2], length, dtype=torch.bool, device=top.device)
        hit.scatter_(-1, k.to(top.device), True)
        shares.append((hit.gather(-1, top) & real).sum(dim=-1) / real.sum(dim=-1))
    return torch.stack([s.to(shares[0].device) for s in shares]).mean(dim=(0, 2))


def importance_recall(truth: list[torch.Tensor], kept: list[torch.Tensor | None], budget: int, n_kv_heads: int,
                      valid: torch.Tensor | None = None) -> float:
    """recall_per_sequence averaged over the batch."""
    return float(recall_per_sequence(truth, kept, budget, n_kv_heads, valid).mean())

