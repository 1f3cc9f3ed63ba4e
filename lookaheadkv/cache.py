"""Compaction of a transformers DynamicCache to the kept entries, and its real size in bytes.

Kept entries are gathered per KV head into new, smaller tensors (no repeat_kv copies); the old tensors
are dropped, so the memory is really freed. Keys keep the RoPE of their original positions, so decoding
continues at the original positions (the caller passes position_ids explicitly).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by the cache's key and value tensors."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def kv_lengths(cache: DynamicCache) -> list[int]:
    """Stored entries per KV head, for each layer."""
    return [layer.keys.shape[-2] for layer in cache.layers]


def crop(cache: DynamicCache, length: int) -> None:
    """Drop every entry past `length` (lookahead or draft tokens), keeping only the prompt. The layers become
    views of their first `length` entries (no copy of the prompt): the few entries past them stay allocated
    only until the next append or compaction, which write new tensors."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def compact(cache: DynamicCache, kept: list[torch.Tensor | None]) -> None:
    """Keep, in each layer, the entries `kept[layer]` ([B, Hkv, k], ascending); None keeps the layer whole."""
    for layer, idx in zip(cache.layers, kept):
        if idx is None:
            continue
        index = idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def compact_valid(key_valid: torch.Tensor, kept: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per layer [B, k] validity of the kept entries. Pads are only kept by a sequence shorter than k,
    and then by every head alike (they score -inf and sort first), so head 0 speaks for all."""
    return [key_valid if idx is None else key_valid.gather(1, idx[:, 0]) for idx in kept]
