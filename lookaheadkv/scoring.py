"""Rows -> scores -> kept indices, per layer and KV head.

score(): 1-D pooling of each query head's attention over the prompt, then reduction of the query heads
of a GQA group onto their KV head. layer_budgets(): uniform or pyramid. select(): top-k with forced
entries (recent window, sinks) and never a pad position unless a sequence is shorter than the budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LookaheadKVError

POOLINGS = ("none", "max", "avg")
GQA_REDUCTIONS = ("mean", "max")


def pool(scores: torch.Tensor, pooling: str, kernel: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1-D pooling along the last axis of [..., L] (stride 1, same length). valid (bool, broadcastable to
    scores): the real positions; pads take part in no window, so a left-padded sequence pools as it would alone
    (an average over pad zeros had diluted its first real positions)."""
    if pooling == "none" or kernel <= 1:
        return scores
    if pooling not in ("max", "avg"):
        raise LookaheadKVError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    real = None if valid is None else valid.expand(shape).reshape(-1, 1, shape[-1])
    if pooling == "max":
        out = F.max_pool1d(flat if real is None else flat.masked_fill(~real, float("-inf")), kernel, stride=1,
                           padding=kernel // 2)
    else:  # the sum over the window's real positions / their count (each as a mean over the whole kernel)
        weight = torch.ones_like(flat) if real is None else real.to(scores.dtype)
        total = F.avg_pool1d(flat if real is None else flat.masked_fill(~real, 0.0), kernel, stride=1,
                             padding=kernel // 2)
        out = total / F.avg_pool1d(weight, kernel, stride=1, padding=kernel // 2).clamp_min(1 / kernel)
    out = out[..., : shape[-1]]
    return (out if real is None else out.masked_fill(~real, 0.0)).reshape(shape)  # pads score 0 (never kept)


def reduce_gqa(scores: torch.Tensor, n_kv_heads: int, how: str) -> torch.Tensor:
    """[B, Hq, L] -> [B, Hkv, L] over each group of query heads sharing a KV head."""
    b, hq, length = scores.shape
    grouped = scores.view(b, n_kv_heads, hq // n_kv_heads, length)
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise LookaheadKVError(f"unknown GQA reduction {how!r}; choose one of {', '.join(GQA_REDUCTIONS)}")


def score(attn: list[torch.Tensor], n_kv_heads: int, pooling: str, kernel: int, gqa: str,
          valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-layer query-head attention [B, Hq, L] -> per-layer KV-head scores [B, Hkv, L]; valid [B, L]: the
    real (non-pad) positions, which alone are pooled."""
    real = None if valid is None else valid[:, None, :]
    # all layers in one go (few kernel launches), unless a device map spreads them over devices
    if len(attn) > 1 and len({(tuple(a.shape), a.device) for a in attn}) == 1:
        n, (b, hq, length) = len(attn), attn[0].shape
        pooled = pool(torch.stack(attn), pooling, kernel, _on(real, attn[0])).view(n * b, hq, length)
        return list(reduce_gqa(pooled, n_kv_heads, gqa).view(n, b, n_kv_heads, length).unbind(0))
    return [reduce_gqa(pool(a, pooling, kernel, _on(real, a)), n_kv_heads, gqa) for a in attn]


def _on(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """t on like's device: per-layer tensors stay on their layer's device when a device map spreads the model."""
    return t if t is None or t.device == like.device else t.to(like.device)


def layer_budgets(budget: int, n_layers: int, length: int, policy: str, floor: int, beta: float = 20.0) -> list[int]:
    """Entries kept per layer. "uniform": `budget` everywhere. "pyramid" (PyramidKV): linear from the
    bottom layer down to the top, the top at max(floor, budget / beta), summing to n_layers * budget;
    a layer never keeps more than the prompt, and what it cannot keep moves to the other layers."""
    budget = min(budget, length)
    if policy == "uniform" or n_layers == 1:
        return [budget] * n_layers
    if policy != "pyramid":
        raise LookaheadKVError(f"unknown budget policy {policy!r}; choose uniform or pyramid")
    low = min(max(floor, budget / beta), budget)
    high = 2 * budget - low
    raw = [high - (high - low) * i / (n_layers - 1) for i in range(n_layers)]
    out = [min(length, max(floor, int(round(x)))) for x in raw]
    # Water-fill the rounding and clipping error so the mean is exactly `budget`.
    diff = n_layers * budget - sum(out)
    order = sorted(range(n_layers), key=lambda i: -raw[i] if diff < 0 else raw[i])
    while diff != 0:
        moved = False
        for i in order:
            step = 1 if diff > 0 else -1
            if (step > 0 and out[i] < length) or (step < 0 and out[i] > floor):
                out[i] += step
                diff -= step
                moved = True
                if diff == 0:
                    break
        if not moved:
            break
    return out


def select(scores: list[torch.Tensor], budgets: list[int], valid: torch.Tensor, forced: torch.Tensor | None,
           lowest: list[int] | None = None) -> list[torch.Tensor | None]:
    """Top-k kept positions per layer and KV head, ascending: [B, Hkv, k], or None where k covers all.

    valid [B, L]: real (non-pad) positions, never kept while real ones remain.
    forced [B, L] or None: positions always kept (window, sinks); they count inside the budget.
    lowest: per layer, the first slot it may keep (a sliding layer's window); budgets must fit above it.
    """
    todo = [i for i, (s, k) in enumerate(zip(scores, budgets)) if k < s.shape[-1]]
    kept: list[torch.Tensor | None] = [None] * len(scores)
    if not todo:
        return kept
    # Every evicting layer at once when their shapes (and devices) agree: one sort instead of a Python loop.
    groups = [todo] if len({(tuple(scores[i].shape), scores[i].device) for i in todo}) == 1 else [[i] for i in todo]
    for group in groups:
        s = torch.stack([scores[i] for i in group]).float()  # [n, B, Hkv, L]
        length = s.shape[-1]
        s = s.masked_fill(~_on(valid, s)[None, :, None, :], float("-inf"))
        if forced is not None:
            s = s.masked_fill(_on(forced, s)[None, :, None, :], float("inf"))
        if lowest is not None and any(lowest[i] > 0 for i in group):
            first = torch.tensor([lowest[i] for i in group], device=s.device)[:, None, None, None]
            s = s.masked_fill(torch.arange(length, device=s.device) < first, float("-inf"))
        ks = [budgets[i] for i in group]
        top = max(ks)
        # A stable sort breaks ties (max-pooling makes many) by position, so the same prompt selects the
        # same entries whether or not it sits in a left-padded batch.
        idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :top]
        if min(ks) < top:  # layers keeping fewer: their surplus slots sort last, then are cut off
            k_of = torch.tensor(ks, device=idx.device)[:, None, None, None]
            idx = idx.masked_fill(torch.arange(top, device=idx.device) >= k_of, length)
        idx = idx.sort(dim=-1).values
        for j, (i, k) in enumerate(zip(group, ks)):
            kept[i] = idx[j, ..., :k]
    return kept
