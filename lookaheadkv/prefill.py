"""Stage 1: prefill the prompt once, optionally recording the attention of its last rows.

Left-padded batches get explicit position ids (each sequence counts from its first real token), so a
padded prompt computes exactly what it would alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from .architectures import n_layers
from .attention import Recording, active_cache, forward_state
from .cache import EvictableCache, crop

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _cache_kw(model) -> str:
    # transformers renamed `past_key_values` to `cache` after 5.17; accept both.
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def sdpa_backends(device: torch.device, prompt: bool) -> list[SDPBackend] | None:
    """The SDPA backends a call may use; None: torch's own choice. A prompt's prefill into an empty cache gets
    torch's choice, cuDNN included: on the H200 it was the fastest at 32K (1.35-1.40 s against 1.71 s without
    it, Llama-3.1-8B shape), and its plan for a fresh length cost tens of ms. Every later call (decode steps,
    rows after a cache, layers of uneven lengths after PyramidKV) leaves cuDNN out: it plans anew for every
    key length, ~1 s a decode step instead of 25 ms there."""
    if device.type != "cuda" or prompt:
        return None
    return _NO_CUDNN


def forward(model, cache: DynamicCache, position_ids: torch.Tensor, input_ids: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 1, valid: torch.Tensor | None = None,
            padded: bool | None = None):
    """One model call over new rows appended to `cache` at `position_ids` (`valid` False at pad rows; `padded`:
    whether there are any, if known); returns the logits.

    Every model call of the pipeline comes through here, so SDPA's backends are chosen here, once a call
    (sdpa_backends)."""
    backends = sdpa_backends(model.device, cache.get_seq_length() == 0)
    if isinstance(cache, EvictableCache):
        cache.begin(position_ids, valid, padded)
    with sdpa_kernel(backends) if backends else contextlib.nullcontext(), active_cache(cache):
        out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=True,
                    logits_to_keep=logits_to_keep, **{_cache_kw(model): cache})
    return out.logits


@dataclass
class Prefill:
    """The prompt's cache and what later stages need to know about it."""

    cache: DynamicCache
    input_ids: torch.Tensor  # [B, L], left-padded
    valid: torch.Tensor  # [B, L] bool, False at pad positions
    next_logits: torch.Tensor  # [B, V] logits of the first answer token
    recordings: dict[int, Recording]  # rows recorded (-1: all) -> their attention onto the prompt
    extra: Recording | None = None  # the ExtraRows' attention onto the prompt, when the prefill ran them
    has_pads: bool | None = None  # whether `valid` has a False (None: not yet looked up; see `padded`)

    @property
    def recording(self) -> Recording:
        """The one recording, when the prefill made exactly one."""
        if len(self.recordings) != 1:
            raise ValueError(f"prefill holds {len(self.recordings)} recordings; index .recordings by rows")
        return next(iter(self.recordings.values()))

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens per sequence: the position id the next token takes."""
        return self.valid.sum(dim=1)

    @property
    def padded(self) -> bool:
        """Whether any position is a pad: known from the prefill, else looked up once (a host sync)."""
        if self.has_pads is None:
            self.has_pads = not bool(self.valid.all())
        return self.has_pads

    def clone(self) -> Prefill:
        """A copy that one method may evict, extend and crop without touching this one, so one prefill serves
        many methods and budgets. It shares the tensors: nothing here writes a cache tensor in place (appends
        concatenate, crops slice, compaction gathers into new tensors), so copying them would only cost time
        and memory (a deep copy per method x budget was a third of the evaluation's time)."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        return Prefill(cache, self.input_ids, self.valid, self.next_logits,
                       {r: rec.copy() for r, rec in self.recordings.items()},
                       None if self.extra is None else self.extra.copy(), self.has_pads)

    def key_valid(self, n_layers: int) -> list[torch.Tensor] | None:
        return [self.valid] * n_layers if self.padded else None


@dataclass
class ExtraRows:
    """Rows appended after the prompt inside its own prefill (single-pass LookaheadKV): their attention onto
    the prompt is recorded, then their entries are cropped away. `active(first_row)` wraps the forward
    (e.g. a LoRA masked to rows >= first_row), so the prompt rows compute exactly what they would alone."""

    embeds: torch.Tensor  # [1 or B, n, hidden]
    active: Callable[[int], contextlib.AbstractContextManager] = lambda first: contextlib.nullcontext()


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            record_rows: int | Sequence[int] = 0, extra: ExtraRows | None = None,
            cache: DynamicCache | None = None, padded: bool | None = None) -> Prefill:
    """Run the prompt through the model into a fresh cache (or `cache`, empty, e.g. one writing into
    preallocated buffers); record the last `record_rows` rows' attention (-1: every row, in chunks; 0: none).
    Several row counts can be recorded in one prefill, so one prefill serves every method (see
    Prefill.clone). `extra` rows ride after the prompt (see ExtraRows). `padded`: whether the mask has a pad,
    if the caller knows (None: looked up, the one host sync here; True is always safe: masks are applied),
    e.g. a training step captured in a CUDA graph, where no sync may happen."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if padded is None:
        padded = attention_mask is not None and not bool(valid.all())
    cache = EvictableCache(model.config) if cache is None else cache
    wanted = [record_rows] if isinstance(record_rows, int) else list(record_rows)
    recs = {r: Recording(rows=r) for r in dict.fromkeys(wanted) if r != 0}
    key_valid = [valid] * n_layers(model) if padded else None
    if extra is None:
        with forward_state(list(recs.values()), key_valid):
            logits = forward(model, cache, positions_from_mask(valid), input_ids=input_ids, valid=valid,
                             padded=padded)
        return Prefill(cache, input_ids, valid, logits[:, -1].float(), recs, has_pads=padded)
    if recs:
        raise ValueError("a prefill with extra rows records only those rows; record prompt rows separately")
    length, n = input_ids.shape[1], extra.embeds.shape[1]
    embeds = torch.cat([model.get_input_embeddings()(input_ids),
                        extra.embeds.expand(input_ids.shape[0], -1, -1)], dim=1)
    positions = torch.cat([positions_from_mask(valid),
                           valid.sum(dim=1, keepdim=True) + torch.arange(n, device=valid.device)], dim=1)
    rec = Recording(rows=n, columns=length)
    with forward_state(rec, key_valid), extra.active(length):
        logits = forward(model, cache, positions, inputs_embeds=embeds, logits_to_keep=n + 1,
                         valid=F.pad(valid, (0, n), value=True), padded=padded)
    crop(cache, length)
    return Prefill(cache, input_ids, valid, logits[:, 0].float(), recs, rec, padded)


@torch.no_grad()
def attend_rows(model, pf: Prefill, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> Recording:
    """Run extra rows (lookahead embeddings, draft tokens) after the cached prompt, record their attention
    onto the prompt's keys, then drop their entries again: the prompt cache is left as it was."""
    n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    rec = Recording(rows=-1, columns=pf.length)
    positions = pf.lengths[:, None] + torch.arange(n, device=pf.valid.device)
    with forward_state(rec, pf.key_valid(n_layers(model))):
        forward(model, pf.cache, positions, input_ids=input_ids, inputs_embeds=inputs_embeds)
    crop(pf.cache, pf.length)
    return rec
