"""Glimpse by generation: LAQ and SpecKV score the prompt with the query rows of a drafted answer.

Both are query-row sources for the shared scoring core. Their rows are those of the last `window` prompt
tokens (recorded in the prefill, as for SnapKV) pooled with those of `k` draft tokens, which the target runs
after its cached prompt at their true positions (prefill.attend_rows) and then drops again. They differ
only in who writes the draft:

- laq (Lookahead Q-Cache, EMNLP 2025): the target itself, greedily, on a copy of the prompt cache that
  SnapKV has compressed to `draft_budget` entries.
- speckv (SpecKV, "Draft-based Approximate Inference", ICLR 2026): a smaller draft model with the same
  tokenizer, greedily, from the same prompt ids.

Decoding then starts from the full prefill's logits, as if no draft had happened. The extra cost shows in
Eviction.parts: "draft_compress" (LAQ's SnapKV copy), "draft_prefill" (SpecKV's draft-model prefill; a
named draft model's one-time load shows as "draft_load"), "draft_decode" (the k greedy steps) and
"draft_rows" (the target's pass over the draft).

A drafted token that is EOS ends a single sequence's draft (the answer would end there). In a batch, all
sequences draft exactly k tokens, so rows stay aligned (a sequence that ended early drafts on past its EOS).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import attention
from .architectures import n_layers
from .decode import Sampling, decode
from .errors import LookaheadKVError
from .generate import evict, timed
from .methods import Method, get_method, register
from .prefill import Prefill, attend_rows, prefill


def _eos(model, batch: int) -> set[int]:
    if batch > 1:
        return set()
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _as_tensor(tokens: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.long, device=device).reshape(len(tokens), -1)


@dataclass
class Drafted(Method, abc.ABC):
    """Shared glimpse of the drafting methods: [last `window` prompt rows + k draft rows]; subclasses draft."""

    k: int = 8
    # Reuse the last draft and its rows' attention for clones of the same prefill (they share input_ids and
    # next_logits): an evaluation that evicts one prefill at many budgets drafts once. The reused evictions
    # then report no draft time.
    reuse_draft: bool = False

    def prefill_rows(self) -> int:
        return self.window

    @abc.abstractmethod
    def draft(self, model, pf: Prefill) -> torch.Tensor:
        """[B, n <= k] greedy draft tokens continuing the prompt (the first one from pf.next_logits)."""

    def glimpse(self, model, pf: Prefill) -> list[torch.Tensor]:
        last = self._last
        if self.reuse_draft and last is not None and last[0] is pf.input_ids and last[1] is pf.next_logits:
            return last[2]
        rec = None
        if self.window > 0:
            base = pf.recordings[self.window]  # copied, so the prefill's own recording serves other methods
            rec = base.copy()
        if self.k > 0:
            tokens = self.draft(model, pf)
            if tokens.shape[1] > 0:
                with timed("draft_rows"):
                    rows = attend_rows(model, pf, input_ids=tokens)
                rec = rows if rec is None else rec.merge(rows)
        if rec is None:
            raise LookaheadKVError(f"{self.name} has no query rows: window and k are both 0; raise one of them")
        out = rec.mean()
        self._last = (pf.input_ids, pf.next_logits, out) if self.reuse_draft else None
        return out

    def __post_init__(self) -> None:
        self._last: tuple | None = None
        if self.k < 0:
            raise LookaheadKVError(f"{self.name}: k (draft tokens) must be >= 0, got {self.k}")


@register
@dataclass
class LAQ(Drafted):
    name = "laq"
    summary = "the target drafts k tokens on a SnapKV-compressed copy; [window + draft] rows score the full cache"
    k: int = 8
    draft_budget: int = 256  # entries per layer and KV head of the compressed copy the draft is written on

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise LookaheadKVError(f"laq writes its draft on a SnapKV copy, which scores with the last `window` "
                                   f"prompt tokens: window must be >= 1, got {self.window}")

    def draft(self, model, pf: Prefill) -> torch.Tensor:
        snap = get_method("snapkv", window=self.window, keep_window=self.keep_window, sinks=self.sinks,
                          pooling=self.pooling, kernel=self.kernel, gqa=self.gqa)
        if self.draft_budget < snap.floor():
            raise LookaheadKVError(f"laq: draft_budget {self.draft_budget} is below the {snap.floor()} entries "
                                   "SnapKV always keeps (window + sinks); raise draft_budget or lower the window")
        with timed("draft_compress"):
            copy = pf.clone()
            key_valid = evict(model, copy, snap, self.draft_budget).key_valid
        with timed("draft_decode"):
            tokens = decode(model, copy, key_valid, _eos(model, pf.input_ids.shape[0]), Sampling(self.k))
        del copy
        return _as_tensor(tokens, pf.input_ids.device)


@functools.cache
def _load_draft(name: str, device: str, dtype: torch.dtype):
    from .models import load_model

    return load_model(name, device=device, dtype=dtype)[0]


def check_same_tokenizer(target, draft) -> None:
    """SpecKV's draft tokens are fed to the target as they are: both models must share one tokenizer (the same
    vocabulary and merges, models.tokenizer_identity); a vocabulary of the same size is not enough."""
    from .models import tokenizer_identity

    t_name = getattr(target, "name_or_path", "") or target.config._name_or_path or "the target"
    d_name = getattr(draft, "name_or_path", "") or draft.config._name_or_path or "the draft model"
    hint = "SpecKV needs a draft model with the target's tokenizer (e.g. qwen2.5-coder-0.5b-instruct drafting " \
           "for qwen2.5-coder-1.5b-instruct)"
    t, d = tokenizer_identity(target), tokenizer_identity(draft)
    if t is not None and d is not None:
        if t != d:
            raise LookaheadKVError(f"draft model {d_name} has a different tokenizer from {t_name}; {hint}")
        return
    if target.config.vocab_size != draft.config.vocab_size:
        raise LookaheadKVError(f"draft model {d_name} has a vocabulary of {draft.config.vocab_size} tokens, "
                               f"{t_name} of {target.config.vocab_size}; {hint}")
    raise LookaheadKVError(f"cannot tell whether draft model {d_name} shares the tokenizer of {t_name}: none is "
                           f"known for {d_name if d is None else t_name} (load both with load_model, or from "
                           "directories that hold their tokenizers)")


@register
@dataclass
class SpecKV(Drafted):
    name = "speckv"
    summary = "a small draft model (same tokenizer) writes k tokens; [window + draft] rows score the prompt"
    k: int = 32
    # A loaded model, or a named model / local path, loaded once per process on the target's device.
    draft_model: Any = field(default=None, repr=False)

    def draft_lm(self, model):
        if self.draft_model is None:
            raise LookaheadKVError("speckv needs a draft model: pass draft_model= (a model or a name) or "
                                   "--draft-model NAME, e.g. qwen2.5-coder-0.5b-instruct")
        p = next(model.parameters())
        dm = self.draft_model
        if isinstance(dm, (str, Path)):
            with timed("draft_load"):  # once per process; kept apart so it never passes for scoring time
                dm = _load_draft(str(dm), str(p.device), p.dtype)
        check_same_tokenizer(model, dm)
        return dm

    def draft(self, model, pf: Prefill) -> torch.Tensor:
        dm = self.draft_lm(model)
        device = next(dm.parameters()).device
        ids, valid = pf.input_ids.to(device), pf.valid.to(device)
        eos = _eos(dm, ids.shape[0])
        ours = getattr(dm.config, "_attn_implementation", None) == attention.NAME
        if ours or not pf.padded:  # batched: our attention applies the pad masks while decoding
            with timed("draft_prefill"):
                dpf = prefill(dm, ids, valid)
            with timed("draft_decode"):
                tokens = decode(dm, dpf, dpf.key_valid(n_layers(dm)), eos, Sampling(self.k))
        else:  # another attention implementation: one unpadded sequence at a time
            tokens = []
            for i in range(ids.shape[0]):
                with timed("draft_prefill"):
                    dpf = prefill(dm, ids[i : i + 1, valid[i]])
                with timed("draft_decode"):
                    tokens += decode(dm, dpf, None, eos, Sampling(self.k))
        del dpf
        return _as_tensor(tokens, pf.input_ids.device)
