"""Eviction inside Hugging Face `model.generate(...)` and `pipeline("text-generation")`:

    with lookaheadkv.evicting(model, method="snapkv", budget=128) as ev:
        out = model.generate(**inputs, max_new_tokens=64)
    ev.last.kept_tokens, ev.last.kv_bytes_kept, ev.last.seconds

Two forward hooks on the model (PyTorch's public extension point) do it, and generate itself is untouched:

- before generate's prefill (the first forward over an empty cache) the cache generate made is swapped for
  an EvictableCache, and the method's glimpse rows are recorded by our attention function during that very
  prefill (the same recording as our own pipeline's prefill);
- after the prefill, the pipeline's stages run once on it (glimpse passes, score, select, compact:
  generate.evict); generate takes the cache back from the model's output and decodes from it;
- before each later forward the cache is told its new rows' positions (generate's own position ids, from
  the attention mask), so decoding continues at the original positions, and our attention takes every
  layer's mask from the cache.

Everything generate does around the forward calls (sampling, logits processors, stopping criteria,
streamers, return_dict_in_generate, batches, beams) is generate's own. LookaheadKV runs its two-pass form
here (prefill, then the lookahead rows over the cached prompt), which scores as its single pass does.
Not supported, with an error: chunked prefill (the first chunk would be evicted alone), assisted decoding
(transformers refuses a cache that cannot be rolled back), inputs_embeds instead of input_ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field

import torch
from torch.nn.attention import sdpa_kernel
from transformers import Cache

from . import attention
from .architectures import check, n_layers
from .attention import Recording, active_cache, forward_state
from .cache import EvictableCache
from .errors import LookaheadKVError
from .generate import Eviction, evict
from .methods import Method, get_method
from .prefill import Prefill, positions_from_mask, sdpa_backends

_CACHE_KWARGS = ("cache", "past_key_values")  # the forward argument's name after and before transformers 5.18


@dataclass
class _Prefill:
    """What the pre-hook learned about a prefill, for the post-hook."""

    cache: EvictableCache
    input_ids: torch.Tensor
    valid: torch.Tensor
    recordings: dict[int, Recording]


@dataclass
class Evicting:
    """The context manager `evicting` returns: hooks on `model` while it is open; `evictions` holds one
    Eviction record (kept tokens, KV bytes before and after, seconds, parts) per prefill it evicted."""

    model: torch.nn.Module = field(repr=False)
    method: Method
    budget: int | float
    evictions: list[Eviction] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._local = threading.local()  # per generate call: a streamer may run generate in another thread
        self._handles: list = []
        self._attn: str | None = None

    @property
    def last(self) -> Eviction:
        """The most recent eviction (of the last generate call's prompt)."""
        if not self.evictions:
            raise LookaheadKVError("nothing was evicted yet: call model.generate inside the `with` block")
        return self.evictions[-1]

    def __enter__(self) -> Evicting:
        check(self.model)
        if getattr(self.model, "_lookaheadkv_evicting", None) is not None:
            raise LookaheadKVError("this model is already inside an evicting() block; leave it before entering another")
        self.model._lookaheadkv_evicting = self
        self._attn = self.model.config._attn_implementation
        if self._attn != attention.NAME:
            attention.install(self.model)  # SDPA plus recording; soft-capped layers get their own path
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.model._lookaheadkv_evicting = None
        self._close()
        if self._attn is not None and self._attn != attention.NAME:
            self.model.set_attn_implementation(self._attn)

    # ------------------------------------------------------------------------------------------- the hooks

    def _close(self) -> None:
        stack = getattr(self._local, "stack", None)
        if stack is not None:
            stack.close()
        self._local.stack, self._local.prefill = None, None

    def _before(self, module, args, kwargs):
        if attention.current_cache() is not None:  # our own pipeline's call (glimpse passes, drafts): as is
            return None
        self._close()  # a forward that raised never reached _after
        name = next((k for k in _CACHE_KWARGS if k in kwargs), None)
        cache = kwargs.get(name) if name else None
        if not isinstance(cache, Cache):
            return None  # a call without a cache is not generate's: left alone
        if isinstance(cache, EvictableCache) and cache.sealed:  # a decode step
            rows = kwargs.get("input_ids", args[0] if args else None)
            if rows is not None and rows.shape[1] > 1:
                raise LookaheadKVError(
                    f"evicting() evicts once, after the whole prompt's prefill, but a forward of {rows.shape[1]} "
                    "rows followed it (chunked prefill, prefill_chunk_size, or generate continuing from an "
                    "evicted cache); pass the whole prompt to one generate call")
            cache.begin(kwargs.get("position_ids"))
            self._local.stack = self._enter(module, False, active_cache(cache))
            return None
        if cache.get_seq_length() > 0:
            return None  # a cache generate was handed already filled: not a prompt to evict
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise LookaheadKVError("evicting() evicts prompts given as input_ids; inputs_embeds are not supported")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise LookaheadKVError("evicting() needs a 2-D attention mask (batch x tokens), not a prepared 4-D one")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -ids.shape[1]:].bool()
        positions = kwargs.get("position_ids")
        ours = EvictableCache(module.config)
        ours.begin(positions_from_mask(valid) if positions is None else positions, valid)
        kwargs = dict(kwargs, **{name: ours})
        recs = {r: Recording(rows=r) for r in self.method.recorded()} if self.method.evicts else {}
        key_valid = None if bool(valid.all()) else [valid] * n_layers(module)
        self._local.stack = self._enter(module, True, forward_state(list(recs.values()), key_valid),
                                        active_cache(ours))
        self._local.prefill = _Prefill(ours, ids, valid, recs)
        return args, kwargs

    @staticmethod
    def _enter(module, prompt: bool, *contexts) -> contextlib.ExitStack:
        """The contexts one forward runs in, left open until _after: SDPA's backends for a prompt's prefill
        or a later call (prefill.sdpa_backends), then `contexts`."""
        stack = contextlib.ExitStack()
        backends = sdpa_backends(next(module.parameters()).device, prompt)
        if backends:
            stack.enter_context(sdpa_kernel(backends))
        for c in contexts:
            stack.enter_context(c)
        return stack

    def _after(self, module, args, kwargs, output):
        pending = getattr(self._local, "prefill", None)
        self._close()
        if pending is None or output is None:
            return None
        logits = output.logits if hasattr(output, "logits") else output[0]
        pf = Prefill(pending.cache, pending.input_ids, pending.valid, logits[:, -1].float(), pending.recordings)
        self.evictions.append(evict(module, pf, self.method, self.budget))
        return None


def evicting(model, method: str | Method = "snapkv", budget: int | float = 128, **options) -> Evicting:
    """Evict the prompt's KV cache inside `model.generate` (and pipelines, which call it) while the block is
    open: once, at the end of generate's prefill, to `budget` entries per layer and KV head (or a ratio of
    the prompt) by `method` with its `options` (as for `generate`). Refuses, with one line, a model that
    eviction cannot serve exactly. Decoding continues at the original positions."""
    m = get_method(method, **options)
    if m.name == "lookahead" and getattr(m, "passes", 2) == 1:
        m = dataclasses.replace(m, passes=2)  # generate's prefill cannot carry the lookahead rows; same scores
    return Evicting(model, m, budget)

