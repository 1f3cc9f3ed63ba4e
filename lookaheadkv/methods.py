"""The eviction methods, a few lines each, in one registry.

Attention-based methods differ only in where their query rows come from (`glimpse`); the shared scoring
core (pooling, GQA reduction, top-k) does the rest. Position and key-norm rules override `scores`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from . import scoring
from .architectures import kv_heads, n_layers
from .errors import LookaheadKVError
from .prefill import ExtraRows, Prefill


@dataclass
class Method:
    """Options shared by every method. `window` is both the observation window (rows whose attention
    scores the prompt) and, with keep_window, the recent tokens always kept inside the budget."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    policy: ClassVar[str] = "uniform"  # budget across layers: uniform or pyramid
    evicts: ClassVar[bool] = True

    window: int = 32
    keep_window: bool = True
    sinks: int = 0
    pooling: str = "max"
    kernel: int = 7
    gqa: str = "mean"

    def prefill_rows(self) -> int:
        """Prompt rows whose attention the prefill records: 0 none, -1 all, n the last n."""
        return 0

    def recorded(self) -> list[int]:
        """Every row count the prefill records for this method: prefill_rows, and any other its glimpse reads
        (LAQ: its own window and its draft's SnapKV window). Pipelines record these."""
        return [self.prefill_rows()] if self.prefill_rows() else []

    def budget_free(self) -> bool:
        """Whether the scores are the same at every budget, so one scoring may serve several (LAQ's draft is
        written on a copy compressed to the eviction budget: not budget-free unless told its draft_budget)."""
        return True

    def prefill_extra(self, model) -> ExtraRows | None:
        """Rows to append after the prompt inside its prefill (single-pass LookaheadKV); None for most."""
        return None

    def glimpse(self, model, pf: Prefill) -> list[torch.Tensor]:
        """Per layer [B, Hq, L]: mean attention of this method's query rows onto the prompt."""
        return pf.recordings[self.prefill_rows()].mean()

    def scores(self, model, pf: Prefill) -> list[torch.Tensor]:
        """Per layer [B, Hkv, L]: higher is kept first."""
        valid = pf.valid if pf.padded else None  # pads to leave out of the pooling windows
        return scoring.score(self.glimpse(model, pf), kv_heads(model), self.pooling, self.kernel, self.gqa, valid)

    def forced(self, pf: Prefill) -> torch.Tensor | None:
        """[B, L] positions always kept: the last `window` and the first `sinks` real tokens."""
        pos = torch.arange(pf.length, device=pf.valid.device)[None, :]
        first = pf.length - pf.lengths[:, None]  # index of the first real token (left padding)
        out = torch.zeros_like(pf.valid)
        if self.keep_window and self.window > 0:
            out |= pos >= pf.length - self.window
        if self.sinks > 0:
            out |= (pos >= first) & (pos < first + self.sinks)
        return out & pf.valid if bool(out.any()) else None

    def floor(self) -> int:
        """Fewest entries a layer may keep: every forced entry. Below it select() would have to drop some of
        them, and its stable sort drops the newest (the question and the chat turn)."""
        return max((self.window if self.keep_window else 0) + self.sinks, 1)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


@register
@dataclass
class Full(Method):
    name = "full"
    summary = "no eviction: the full cache (upper bound)"
    evicts = False


@register
@dataclass
class StreamingLLM(Method):
    name = "streamingllm"
    summary = "keep the first `sinks` tokens and the most recent ones"
    sinks: int = 4
    keep_window: bool = False

    def scores(self, model, pf):
        pos = torch.arange(pf.length, device=pf.valid.device, dtype=torch.float32)
        shape = (pf.valid.shape[0], kv_heads(model), pf.length)
        return [pos.expand(shape)] * n_layers(model)


@register
@dataclass
class SnapKV(Method):
    name = "snapkv"
    summary = "attention of the last `window` prompt tokens, max-pooled, top-k per KV head"

    def prefill_rows(self):
        return self.window

    def __post_init__(self) -> None:
        if self.window < 1:  # its window's rows are its only query rows
            raise LookaheadKVError(f"{self.name} scores with the last `window` prompt tokens: window must be >= 1, "
                                   f"got {self.window}")


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scores, budgets shrinking from lower to upper layers (same total)"
    policy = "pyramid"


@register
@dataclass
class H2O(Method):
    name = "h2o"
    summary = "heavy hitters: attention accumulated over all prompt tokens (chunked), plus recent tokens"
    pooling: str = "none"

    def prefill_rows(self):
        return -1


@register
@dataclass
class TOVA(Method):
    name = "tova"
    summary = "attention of the last prompt token alone"
    window: int = 1
    pooling: str = "none"

    def prefill_rows(self):
        return 1


@register
@dataclass
class KNorm(Method):
    name = "knorm"
    summary = "keep the keys with the smallest L2 norm"
    keep_window: bool = False

    def scores(self, model, pf):
        return [-layer.keys.float().norm(dim=-1) for layer in pf.cache.layers]


@register
@dataclass
class Random(Method):
    name = "random"
    summary = "uniformly random positions (seeded): a floor to compare against"
    keep_window: bool = False
    seed: int = 0

    def scores(self, model, pf):
        g = torch.Generator().manual_seed(self.seed)
        shape = (n_layers(model), pf.valid.shape[0], kv_heads(model), pf.length)
        return list(torch.rand(shape, generator=g).to(pf.valid.device).unbind(0))


def get_method(name: str | Method, **options) -> Method:
    """A method instance by name, with options (unknown options and bad values are clear errors)."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise LookaheadKVError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls)}
    options = {k: v for k, v in options.items() if v is not None}
    bad = set(options) - allowed
    if bad:
        raise LookaheadKVError(
            f"method {name!r} has no option {', '.join(sorted(bad))}; it takes {', '.join(sorted(allowed))}"
        )
    m = cls(**options)
    if m.pooling not in scoring.POOLINGS:
        raise LookaheadKVError(f"unknown pooling {m.pooling!r}; choose one of {', '.join(scoring.POOLINGS)}")
    if m.gqa not in scoring.GQA_REDUCTIONS:
        raise LookaheadKVError(f"unknown GQA reduction {m.gqa!r}; choose one of {', '.join(scoring.GQA_REDUCTIONS)}")
    if m.window < 0 or m.sinks < 0 or m.kernel < 1:
        raise LookaheadKVError("window and sinks must be >= 0 and kernel >= 1")
    return m


def parse_spec(spec: str) -> tuple[str, dict]:
    """"laq:k=8:draft_budget=128" -> ("laq", {"k": 8, "draft_budget": 128}); values: int, float, true/false, text."""
    name, *opts = spec.strip().split(":")
    options = {}
    for o in opts:
        if "=" not in o:
            raise LookaheadKVError(f"method option {o!r} in {spec!r} is not key=value")
        k, v = o.split("=", 1)
        options[k] = _value(v)
    return name, options


def parse_methods(spec: str | Sequence[str] | None) -> dict[str, Method]:
    """"snapkv,lookahead:window=16" (or a list of such specs) -> {spec: Method}; None: every method."""
    items = list(METHODS) if spec is None else spec.split(",") if isinstance(spec, str) else list(spec)
    out = {}
    for item in filter(None, (x.strip() for x in items)):
        name, options = parse_spec(item)
        out[item] = get_method(name, **options)
    return out


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
