"""The KV cache that eviction works on: a transformers Cache that remembers where its entries came from.

`EvictableCache` holds, per layer and KV head, the entries eviction kept, together with the original
position of each one (pads marked -1). Kept entries are gathered into new, smaller tensors (no repeat_kv
copies); the old tensors are dropped, so the memory is really freed. Keys keep the RoPE of their original
positions and the cache reports the logical length (every slot it has seen) as its sequence length, so
transformers' generate and our decode continue at the original positions; once evicted, it gives our
attention function each layer's mask from those positions:

- full-attention layers see every kept entry but pads;
- sliding-window layers keep at most window - 1 entries, all within the window, and see an entry only while
  it is inside the window of the row looking at it (the window moves on while decoding; an expired entry
  is hidden at once and dropped when the layer is trimmed back to window - 1 entries).

Until eviction every layer, sliding ones included, keeps the whole prompt in slot order, so glimpse rows
run after the prompt (lookahead, drafts) and scores line up with prompt slots in every layer.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from .architectures import layer_windows


class EvictableLayer(DynamicLayer):
    """One layer: keys/values [B, Hkv, T, D] and positions [B, 1 or Hkv, T] (one row while all heads hold
    the same slots, one per KV head after eviction)."""

    is_croppable = False  # a trimmed sliding layer cannot be rolled back (assisted decoding is refused)

    def __init__(self, sliding_window: int | None = None):
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.positions: torch.Tensor | None = None
        self.seen = 0  # slots appended so far: the logical length
        self.sealed = False  # evicted: masks come from positions, a sliding layer trims to its window
        self.own_mask = False  # sealed and needing our mask even for a single new row (sliding, or padded batch)
        self._keys_at: torch.Tensor | None = None  # positions of the keys the last update returned
        self._rows_at: torch.Tensor | None = None  # [B, q] positions of the rows it appended

    def append(self, keys: torch.Tensor, values: torch.Tensor, rows_at: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = DynamicLayer.update(self, keys, values)
        new = rows_at[:, None, :]
        pos = new if self.positions is None else torch.cat(
            [self.positions, new.expand(-1, self.positions.shape[1], -1)], dim=-1)
        self.seen += keys.shape[-2]
        self._keys_at, self._rows_at, self.positions = pos, rows_at, pos
        if self.sealed and self.is_sliding and k.shape[-2] > self.sliding_window - 1:
            # as transformers' sliding layer: the next row needs at most window - 1 earlier entries, the most
            # recent ones in storage order (position order, per head); this call still sees them all
            self._trim(self.sliding_window - 1)
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' entry point: rows continue each sequence's positions (EvictableCache.update passes
        the positions it was told)."""
        return self.append(key_states, value_states, self.next_positions(key_states))

    def next_positions(self, key_states: torch.Tensor) -> torch.Tensor:
        q = key_states.shape[-2]
        steps = torch.arange(q, device=key_states.device)
        if self.positions is None:
            return steps.expand(key_states.shape[0], -1)
        return self.positions.amax(dim=(1, 2))[:, None] + 1 + steps

    def _trim(self, keep: int) -> None:
        self.keys, self.values = self.keys[..., -keep:, :], self.values[..., -keep:, :]
        self.positions = self.positions[..., -keep:]

    def crop_to(self, length: int) -> None:
        """Drop every entry past storage index `length` (rows run after the prompt, before eviction)."""
        if self.keys is None or self.keys.shape[-2] <= length:
            return
        self.seen -= self.keys.shape[-2] - length
        self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]
        self.positions = self.positions[..., :length]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.keys is not None:
            self.crop_to(self.keys.shape[-2] + tokens_to_remove)
        elif tokens_to_remove > 0:
            self.crop_to(tokens_to_remove)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the entries idx [B, Hkv, k] (storage indices, ascending) of each KV head."""
        idx = idx.to(self.keys.device)  # scores of a layer may live elsewhere (a device map)
        self.keys = self.keys.gather(2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.expand(-1, idx.shape[1], -1).gather(2, idx)

    def seal(self, padded: bool) -> None:
        if self.is_sliding and self.keys is not None and self.keys.shape[-2] > self.sliding_window - 1:
            self._trim(self.sliding_window - 1)
        self.sealed, self.own_mask = True, padded or self.is_sliding

    def get_seq_length(self) -> int:
        return self.seen

    def stored(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored() + query_length, 0  # transformers' masks are sized to what is stored

    def mask(self, n_heads: int) -> torch.Tensor | None:
        """[B, 1 or Hq, q, T] bool for the last call's rows over the keys it returned; None where transformers'
        mask is right (not evicted yet, or a full layer of an unpadded batch with one new row)."""
        if not self.sealed or self._keys_at is None:
            return None
        kpos, rows = self._keys_at, self._rows_at
        if not self.own_mask and rows.shape[1] == 1:
            return None
        if not self.is_sliding:
            kpos = kpos[:, :1]  # every stored entry precedes the new rows, and all heads keep pads alike
        k, r = kpos[:, :, None, :], rows[:, None, :, None]
        seen = (k >= 0) & (k <= r)
        if self.is_sliding:
            seen &= k > r - self.sliding_window
        n_keys, q = kpos.shape[-1], rows.shape[1]
        if q > 1:  # a pad row sees itself, so its softmax is never empty (its output is never used)
            own = torch.arange(n_keys, device=kpos.device) == n_keys - q + torch.arange(q, device=kpos.device)[:, None]
            seen = seen | (own & (rows < 0)[:, :, None])[:, None]
        return seen.repeat_interleave(n_heads // seen.shape[1], dim=1) if seen.shape[1] > 1 else seen

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


class EvictableCache(DynamicCache):
    """A DynamicCache of EvictableLayers, one per decoder layer, each with the model's sliding window.

    Whoever runs a forward over it first says where the new rows sit (`begin`): our pipeline's forward does,
    and so do the hooks `evicting` puts on a model for transformers' generate."""

    def __init__(self, config):
        Cache.__init__(self, layers=[EvictableLayer(w) for w in layer_windows(config)])
        self._rows_at: torch.Tensor | None = None
        self.padded = False  # a pad was ever appended: masks are ours after eviction

    def begin(self, position_ids: torch.Tensor | None, valid: torch.Tensor | None = None,
              padded: bool | None = None) -> None:
        """The next forward appends rows at `position_ids` [B or 1, q] (None: each sequence's next positions);
        `valid` [B, q] marks pad rows False; `padded`: whether it has any (None: looked up, a host sync)."""
        if position_ids is not None and valid is not None:
            position_ids = torch.where(valid.bool(), position_ids, -1)
            self.padded = self.padded or (not bool(valid.all()) if padded is None else padded)
        self._rows_at = position_ids

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        rows = self._rows_at
        rows = layer.next_positions(key_states) if rows is None else rows.expand(key_states.shape[0], -1)
        if layer_idx == len(self.layers) - 1:
            self._rows_at = None  # told once per forward
        return layer.append(key_states, value_states, rows.to(key_states.device))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].stored()  # transformers' masks index what is stored

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def attention_mask(self, layer_idx: int, n_heads: int) -> torch.Tensor | None:
        return self.layers[layer_idx].mask(n_heads)

    @property
    def sealed(self) -> bool:
        return bool(self.layers) and all(layer.sealed for layer in self.layers)

    def seal(self) -> None:
        """Eviction is over: sliding layers keep at most window - 1 entries, masks come from positions."""
        for layer in self.layers:
            layer.seal(self.padded)


def stack(caches: list[EvictableCache]) -> EvictableCache:
    """Evicted caches of the same model stacked along the batch (to decode them together): each layer is
    left-padded to the longest with entries at position -1, which no mask ever shows."""
    out = copy.copy(caches[0])
    out.layers = []
    for layers in zip(*(c.layers for c in caches)):
        width = max(layer.stored() for layer in layers)
        heads = max(layer.positions.shape[1] for layer in layers)
        merged = EvictableLayer(layers[0].sliding_window)
        pad = [width - layer.stored() for layer in layers]
        merged.keys = torch.cat([F.pad(x.keys, (0, 0, p, 0)) for x, p in zip(layers, pad)])
        merged.values = torch.cat([F.pad(x.values, (0, 0, p, 0)) for x, p in zip(layers, pad)])
        merged.positions = torch.cat([F.pad(x.positions.expand(-1, heads, -1), (p, 0), value=-1)
                                      for x, p in zip(layers, pad)])
        merged.is_initialized, merged.device = True, layers[0].device
        merged.seen = max(layer.seen for layer in layers)
        merged.seal(padded=True)
        out.layers.append(merged)
    out.padded = True
    return out


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by the cache's key and value tensors."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def kv_lengths(cache: DynamicCache) -> list[int]:
    """Stored entries per KV head, for each layer."""
    return [layer.keys.shape[-2] for layer in cache.layers]


def windows(cache: DynamicCache) -> list[int | None]:
    """Each layer's sliding window (None: full attention)."""
    return [getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            for layer in cache.layers]


def crop(cache: DynamicCache, length: int) -> None:
    """Drop every entry past `length` (lookahead or draft tokens), keeping only the prompt. The layers become
    views of their first `length` entries (no copy of the prompt): the few entries past them stay allocated
    only until the next append or compaction, which write new tensors."""
    for layer in cache.layers:
        if isinstance(layer, EvictableLayer):
            layer.crop_to(length)
            continue
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def compact(cache: DynamicCache, kept: list[torch.Tensor | None]) -> None:
    """Keep, in each layer, the entries `kept[layer]` ([B, Hkv, k], ascending); None keeps the layer whole."""
    for layer, idx in zip(cache.layers, kept):
        if idx is None:
            continue
        if isinstance(layer, EvictableLayer):
            layer.keep(idx)
            continue
        idx = idx.to(layer.keys.device)
        layer.keys = layer.keys.gather(2, idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, idx[..., None].expand(-1, -1, -1, layer.values.shape[-1]))


def seal(cache: DynamicCache) -> None:
    """End eviction (EvictableCache only; a plain cache has nothing to seal)."""
    if isinstance(cache, EvictableCache):
        cache.seal()


def key_valid(cache: DynamicCache) -> list[torch.Tensor] | None:
    """Per layer [B, T] validity of the stored entries (an EvictableCache knows it; None otherwise)."""
    if not isinstance(cache, EvictableCache):
        return None
    return [layer.positions[:, 0] >= 0 for layer in cache.layers]


def compact_valid(key_valid: torch.Tensor, kept: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per layer [B, k] validity of the kept entries. Pads are only kept by a sequence shorter than k,
    and then by every head alike (they score -inf and sort first), so head 0 speaks for all."""
    return [key_valid if idx is None else key_valid.gather(1, idx[:, 0].to(key_valid.device)) for idx in kept]
