"""Glimpse by generation: LAQ and SpecKV score the prompt with the query rows of a drafted answer.

Both are query-row sources for the shared scoring core: the rows of the last `window` prompt tokens
(recorded in the prefill, as for SnapKV) pooled with the rows of up to `k` draft tokens, which are then
dropped again. They differ in who writes the draft and where its rows come from:

- laq (Lookahead Q-Cache, EMNLP 2025): the target itself decodes the draft on a copy of the prompt cache that
  SnapKV has compressed to the eviction budget, and the queries those decode steps compute are the rows
  (see LAQ below: what the paper's code does, and where ours differs).
- speckv (SpecKV, "Draft-based Approximate Inference", ICLR 2026): a smaller draft model with the same
  tokenizer writes the draft greedily from the same prompt ids; the target runs the draft tokens after its
  cached prompt at their true positions (prefill.attend_rows), and their rows are those of that pass.

Decoding then starts from the full prefill's logits, as if no draft had happened. The extra cost shows in
Eviction.parts: "draft_compress" (LAQ's SnapKV copy), "draft_prefill" (SpecKV's draft-model prefill; a
named draft model's one-time load shows as "draft_load"), "draft_decode" (the greedy steps), "draft_score"
(LAQ: its captured queries against the full prompt keys) and "draft_rows" (SpecKV: the target's pass over
the draft).

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
from .attention import Recording
from .decode import Sampling, decode
from .errors import LookaheadKVError
from .generate import evict, eviction_budget, timed
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
    """Shared glimpse of the drafting methods: [last `window` prompt rows + the draft's rows]."""

    k: int = 8
    # Reuse the last draft's rows for clones of the same prefill (they share input_ids and next_logits) at
    # the same draft budget: an evaluation that evicts one prefill at many budgets drafts once per draft
    # budget. The reused evictions then report no draft time.
    reuse_draft: bool = False

    def prefill_rows(self) -> int:
        return self.window

    @abc.abstractmethod
    def draft_rows(self, model, pf: Prefill) -> Recording | None:
        """The draft's rows' attention onto the prompt (None: the draft came out empty)."""

    def _reuse_key(self) -> object:
        return None

    def _recording(self, pf: Prefill, rows: int) -> Recording:
        """The prefill's recording of its last `rows` rows, which this method reads."""
        if rows not in pf.recordings:
            raise LookaheadKVError(f"{self.name} reads the prefill's recording of the last {rows} rows, which this "
                                   "prefill lacks: prefill with record_rows=method.recorded()")
        return pf.recordings[rows]

    def glimpse(self, model, pf: Prefill) -> list[torch.Tensor]:
        last, key = self._last, self._reuse_key()
        if self.reuse_draft and last is not None and last[0] is pf.input_ids and last[1] is pf.next_logits \
                and last[2] == key:
            return last[3]
        rec = None
        if self.window > 0:
            rec = self._recording(pf, self.window).copy()  # copied: the prefill's own serves other methods too
        rows = self.draft_rows(model, pf) if self.k > 0 else None
        if rows is not None:
            rec = rows if rec is None else rec.merge(rows)
        if rec is None:
            raise LookaheadKVError(f"{self.name} has no query rows: window and k are both 0; raise one of them")
        out = rec.mean()
        self._last = (pf.input_ids, pf.next_logits, key, out) if self.reuse_draft else None
        return out

    def __post_init__(self) -> None:
        self._last: tuple | None = None
        if self.k < 0:
            raise LookaheadKVError(f"{self.name}: k (draft tokens) must be >= 0, got {self.k}")


@register
@dataclass
class LAQ(Drafted):
    """Lookahead Q-Cache (Wang et al., "Lookahead Q-Cache: Achieving More Consistent KV Cache Eviction via
    Pseudo Query", EMNLP 2025, arXiv 2505.20334), as its authors' code runs it (github.com/noforit/
    Lookahead_Q-Cache: LlamaForCausalLM_forward_LAQ, select_KV_lookahead_stage and select_KV_decoding_stage
    in pyramidkv/llama_model.py, SnapKVCluster.update_kv_LAQ and DynamicCache_LAQ in
    pyramidkv/pyramidkv_utils.py, the settings of run_LAQ.sh and run_needle_in_haystack.py):

    1. After the full prefill, SnapKV (its last `draft_window` = 32 rows, max-pooled, kernel 7) compresses a
       copy of the cache to the eviction budget itself: the scripts set the draft's capacity to the
       eviction's (`draft_budget` None, the default, follows the budget; a number fixes it).
    2. The target decodes greedily on that copy for `k` = 8 steps, fed the full prefill's first token and
       then each step's own (an EOS ends them early). The queries those steps compute, every layer's,
       post-RoPE, are kept as they run: the pseudo lookahead queries. No second pass over the full cache.
    3. Those k rows and the last `window` = 8 prompt rows (the scripts' default, "LAQ++"; window=0 is LAQ
       alone, with no recent window kept) score the full prompt's keys: softmax over the prompt keys,
       rows pooled, max-pooled (kernel 7); the top budget - window positions are kept with the window.
    4. Decoding starts from the full prefill's logits, on the full cache evicted so; the draft is dropped.

    Its cost: the SnapKV copy, k forward steps of the whole model over a budget-sized cache, and a k-row
    score per layer over the prompt keys. Where ours differs, on purpose: the authors' cache repeats the KV
    heads (repeat_kv) and keeps entries per query head; ours reduces each GQA group onto its KV head (`gqa`),
    as every method here does. Their second-stage mask is SnapKV's triangle laid on the last window + k
    prompt columns, which hides a few prompt keys from some rows; ours lets each window row see its causal
    prefix and each draft row the whole prompt. A batch drafts k tokens in every sequence."""

    name = "laq"
    summary = "the target drafts k tokens on a SnapKV copy at the budget; their queries + the window's score the prompt"
    window: int = 8
    k: int = 8
    draft_window: int = 32  # the SnapKV window that compresses the copy the draft is written on
    draft_budget: int | None = None  # entries per layer and KV head of that copy; None: the eviction budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k > 0 and self.draft_window < 1:
            raise LookaheadKVError(f"laq writes its draft on a SnapKV copy, which scores with the last "
                                   f"`draft_window` prompt tokens: draft_window must be >= 1, got {self.draft_window}")

    def recorded(self) -> list[int]:
        return [r for r in dict.fromkeys([self.window, self.draft_window if self.k > 0 else 0]) if r]

    def budget_free(self) -> bool:
        return self.k == 0 or self.draft_budget is not None

    def _budget(self) -> int:
        b = self.draft_budget if self.draft_budget is not None else eviction_budget()
        if b is None:
            raise LookaheadKVError("laq drafts on a copy compressed to the eviction budget, unknown here (scores "
                                   "asked outside evict()): evict with a budget, or give draft_budget=N")
        return b

    def _reuse_key(self) -> object:
        return self._budget() if self.k > 0 else None

    def draft_queries(self, model, pf: Prefill) -> tuple[torch.Tensor, attention.Queries]:
        """The draft tokens [B, n <= k] decoded on the SnapKV copy and the queries those steps computed."""
        budget = self._budget()
        snap = get_method("snapkv", window=self.draft_window, sinks=self.sinks, pooling=self.pooling,
                          kernel=self.kernel, gqa=self.gqa)
        if budget < snap.floor():
            raise LookaheadKVError(f"laq drafts on a SnapKV copy at {budget} entries, below the {snap.floor()} "
                                   f"SnapKV keeps (draft_window {self.draft_window} + sinks {self.sinks}); raise the "
                                   "budget (or draft_budget) or lower draft_window")
        self._recording(pf, self.draft_window)  # the SnapKV copy's scores read it
        with timed("draft_compress"):
            copy = pf.clone()
            key_valid = evict(model, copy, snap, budget).key_valid
        # k + 1 tokens take k forward steps: the first token comes from the full prefill, the last is not fed
        with timed("draft_decode"), attention.capture_queries() as queries:
            tokens = decode(model, copy, key_valid, _eos(model, pf.input_ids.shape[0]), Sampling(self.k + 1))
        del copy
        return _as_tensor([t[: queries.n] for t in tokens], pf.input_ids.device), queries

    def draft(self, model, pf: Prefill) -> torch.Tensor:
        """[B, n <= k] the tokens whose queries score the prompt."""
        return self.draft_queries(model, pf)[0]

    def draft_rows(self, model, pf: Prefill) -> Recording | None:
        _, queries = self.draft_queries(model, pf)
        if queries.n == 0:
            return None
        with timed("draft_score"):  # after every prompt key: the draft rows see the whole prompt
            keys = [layer.keys for layer in pf.cache.layers]
            return queries.attention(keys, pf.length, pf.valid if pf.padded else None)


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

    def draft_rows(self, model, pf: Prefill) -> Recording | None:
        tokens = self.draft(model, pf)
        if tokens.shape[1] == 0:
            return None
        with timed("draft_rows"):
            return attend_rows(model, pf, input_ids=tokens)

    def draft(self, model, pf: Prefill) -> torch.Tensor:
        """[B, n <= k] greedy draft tokens of the draft model continuing the prompt."""
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
