"""The public entry points: evict a prompt's cache with a method, and generate an answer.

The pipeline, in order: prefill -> glimpse -> score -> select -> compact -> decode.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from . import cache as kvcache
from . import scoring
from .architectures import n_layers as count_layers
from .decode import Sampling, decode
from .errors import LookaheadKVError
from .methods import Method, get_method
from .models import devices
from .prefill import Prefill, prefill


@dataclass
class Eviction:
    """What eviction did to one prefilled cache."""

    method: str
    budget: int  # requested entries per layer and KV head (mean over layers)
    prompt_tokens: int
    kept_per_layer: list[int]
    kv_bytes_full: int
    kv_bytes_kept: int
    key_valid: list[torch.Tensor] | None = field(repr=False, default=None)
    kept: list[torch.Tensor | None] = field(repr=False, default_factory=list)
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # seconds per part: the method's own, score, select, compact

    @property
    def kept_tokens(self) -> float:
        return sum(self.kept_per_layer) / len(self.kept_per_layer)


def check_budget(budget: int | float) -> int | float:
    """A budget is a whole number of tokens (an int >= 1) or a ratio of the prompt, a float in (0, 1). Anything
    else is refused, 1.0 included: one token, or the whole prompt?"""
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool) and budget >= 1:
        return int(budget)
    if isinstance(budget, float) and 0 < budget < 1:  # nan fails both comparisons
        return budget
    raise LookaheadKVError(f"budget must be a positive whole number of tokens (e.g. 128) or a ratio of the prompt "
                           f"in (0, 1) (e.g. 0.1), got {budget!r}")


def resolve_budget(budget: int | float, length: int) -> int:
    """Budget in tokens, or as a ratio of the prompt when 0 < budget < 1."""
    b = check_budget(budget)
    return max(1, int(b * length)) if isinstance(b, float) else b


def _sync(model) -> None:
    """Wait for the model's devices (all of them under a device map), so host clocks cover their work."""
    for d in devices(model):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


_PARTS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("eviction_parts", default=None)


@contextlib.contextmanager
def timed(part: str) -> Iterator[None]:
    """Time a method's own eviction work (draft generation, extra forward passes) as Eviction.parts[part];
    evict() reports what remains of scoring as "score", then "select" and "compact"."""
    parts = _PARTS.get()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if parts is not None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            parts[part] = parts.get(part, 0.0) + time.perf_counter() - t0


_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("eviction_budget", default=None)


def eviction_budget() -> int | None:
    """The budget (entries per layer and KV head) of the eviction whose scores are being computed now; None
    outside evict(). LAQ drafts on a copy compressed to it."""
    return _BUDGET.get()


def evict(model, pf: Prefill, method: Method, budget: int | float) -> Eviction:
    """glimpse -> score -> select -> compact, in place on pf.cache."""
    parts: dict[str, float] = {}
    token = _PARTS.set(parts)  # a fresh dict, so an eviction nested in a method's glimpse reports apart
    try:
        return _evict(model, pf, method, budget, parts)
    finally:
        _PARTS.reset(token)


def _evict(model, pf: Prefill, method: Method, budget: int | float, parts: dict[str, float]) -> Eviction:
    t0 = time.perf_counter()
    n_layers = count_layers(model)
    full = kvcache.kv_bytes(pf.cache)
    b = resolve_budget(budget, pf.length) if method.evicts else pf.length
    if method.evicts and b < min(method.floor(), pf.length):
        window = method.window if method.keep_window else 0
        raise LookaheadKVError(
            f"budget {b} is below what {method.name} always keeps ({method.floor()}: window {window} + sinks "
            f"{method.sinks}); raise the budget or lower --window or --sinks"
        )
    kept: list[torch.Tensor | None] = [None] * n_layers
    if method.evicts and b <= pf.length:
        t = time.perf_counter()
        token = _BUDGET.set(b)
        try:
            scores = method.scores(model, pf)
        finally:
            _BUDGET.reset(token)
        _sync(model)
        parts["score"] = time.perf_counter() - t - sum(parts.values())  # the method's own parts stand apart
        t = time.perf_counter()
        kept = select_kept(model, pf, method, b, scores)
        _sync(model)
        parts["select"] = time.perf_counter() - t
        t = time.perf_counter()
        kvcache.compact(pf.cache, kept)
        _sync(model)
        parts["compact"] = time.perf_counter() - t
    kvcache.seal(pf.cache)
    key_valid = (kvcache.key_valid(pf.cache) or kvcache.compact_valid(pf.valid, kept)) if pf.padded else None
    _sync(model)
    return Eviction(method.name, min(b, pf.length), pf.length, kvcache.kv_lengths(pf.cache), full,
                    kvcache.kv_bytes(pf.cache), key_valid, kept, time.perf_counter() - t0, parts)


def select_kept(model, pf: Prefill, method: Method, budget: int, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The select step: per layer [B, Hkv, k] the positions `method` keeps at `budget` by `scores` (its per-layer
    budgets, forced positions and, on sliding layers, only the slots the next row can see). For the scripts that
    judge a selection without compacting."""
    budgets = scoring.layer_budgets(budget, count_layers(model), pf.length, method.policy, method.floor())
    lowest = window_slots(kvcache.windows(pf.cache), pf.length)
    budgets = [min(k, pf.length - lo) for k, lo in zip(budgets, lowest)]
    return scoring.select(scores, budgets, pf.valid, method.forced(pf), lowest)


def window_slots(windows: list[int | None], length: int) -> list[int]:
    """Per layer, the first prompt slot it may keep: a sliding layer only the last window - 1 slots (the ones
    the first new row can still see; sequences are right-aligned, so the same slots for every sequence)."""
    return [0 if w is None else max(0, length - (w - 1)) for w in windows]


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 method: str | Method = "full", budget: int | float = 128, sampling: Sampling | None = None,
                 eos_ids: set[int] | None = None, **options) -> tuple[list[list[int]], Eviction, dict[str, float]]:
    """Token-level pipeline on a (left-padded) batch: returns new tokens per sequence, the eviction
    record and the seconds spent in prefill, eviction (and its parts, "eviction.<part>") and decode."""
    m = get_method(method, **options)
    sampling = sampling or Sampling()
    if eos_ids is None:
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    t0 = time.perf_counter()
    pf = prefill(model, input_ids, attention_mask, record_rows=m.recorded() if m.evicts else 0,
                 extra=m.prefill_extra(model) if m.evicts else None)
    _sync(model)
    t1 = time.perf_counter()
    ev = evict(model, pf, m, budget)
    t2 = time.perf_counter()
    tokens = decode(model, pf, ev.key_valid, eos_ids, sampling)
    _sync(model)
    t3 = time.perf_counter()
    parts = {f"eviction.{k}": v for k, v in ev.parts.items()}
    return tokens, ev, {"prefill": t1 - t0, "eviction": t2 - t1, **parts, "decode": t3 - t2}


@dataclass
class Answer:
    answer: str
    model: str
    method: str
    budget: int
    prompt_tokens: int
    kept_tokens: float
    kv_bytes_full: int
    kv_bytes_kept: int
    new_tokens: int
    timings_s: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def build_prompt(tokenizer, context: str, question: str) -> str:
    """The chat-formatted prompt: the context, then the question (query-aware eviction)."""
    if not context.strip():
        raise LookaheadKVError("the context is empty; give a document to answer questions about")
    if not question.strip():
        raise LookaheadKVError("the question is empty")
    user = f"{context.strip()}\n\nAnswer the question using the text above.\nQuestion: {question.strip()}"
    messages = [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user + "\nAnswer:"


def tokenize(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = int(enc["attention_mask"].sum(dim=1).max())
    if limit is not None and longest + max_new_tokens > limit:
        raise LookaheadKVError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit}; "
            "shorten the context or lower --max-new-tokens"
        )
    return enc


def generate(model, tokenizer, context: str | list[str], question: str | list[str], method: str | Method = "full",
             budget: int | float = 128, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, **options) -> Answer | list[Answer]:
    """Answer `question` about `context` with the prompt's KV cache evicted to `budget` by `method`.

    Lists of contexts and questions run as one left-padded batch and return a list of answers.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise LookaheadKVError(f"temperature must be a finite number >= 0 (0 decodes greedily), got {temperature}")
    if not 0 < top_p <= 1:
        raise LookaheadKVError(f"top_p must be in (0, 1], got {top_p}")
    single = isinstance(context, str)
    contexts = [context] if single else list(context)
    questions = [question] * len(contexts) if isinstance(question, str) else list(question)
    if len(questions) != len(contexts):
        raise LookaheadKVError(f"{len(contexts)} contexts but {len(questions)} questions")
    prompts = [build_prompt(tokenizer, c, q) for c, q in zip(contexts, questions)]
    enc = tokenize(model, tokenizer, prompts, max_new_tokens)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    eos = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    tokens, ev, timings = generate_ids(model, enc["input_ids"], enc["attention_mask"], method, budget, sampling,
                                       eos - {None}, **options)
    answers = [
        Answer(tokenizer.decode(t, skip_special_tokens=True).strip(), getattr(model, "name_or_path", ""), ev.method,
               ev.budget, int(enc["attention_mask"][i].sum()), ev.kept_tokens, ev.kv_bytes_full, ev.kv_bytes_kept,
               len(t), timings)
        for i, t in enumerate(tokens)
    ]
    return answers[0] if single else answers


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
