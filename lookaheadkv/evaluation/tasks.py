"""Task registry, the Sample every task produces, and length fitting.

A sample is rendered as one user message, `context + query`, then the assistant turn begins with
`answer_prefix` (RULER puts such a prefix after the prompt). The split between context and query is what
the query-agnostic mode uses: the context is compressed before the query is seen.

Every sample is a pure function of (task, target length, seed, index, tokenizer): the random generator is
seeded from those, so a run can be resumed or repeated and regenerates the very same prompts. QA and essay
material comes only from the TEST split of lookaheadkv.data (LookaheadKV trains on the train split).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import LookaheadKVError


@dataclass
class Sample:
    id: str
    task: str
    family: str  # "ruler", "qa" or "fidelity"
    context: str  # the part of the user message that holds the document(s): compressed first when query-agnostic
    query: str  # the rest of the user message (the question), right after the context
    answers: list[str]
    answer_prefix: str = ""  # the start of the assistant's turn
    metric: str = "all"  # see runner.score_answer
    max_new_tokens: int = 32
    prompt_tokens: int = 0  # filled in when fitted to the target length
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Parts:
    """What a task's builder returns for one sample."""

    context: str
    query: str
    answers: list[str]
    answer_prefix: str = ""
    meta: dict = field(default_factory=dict)


Builder = Callable[[random.Random, int], Parts]  # (rng, size) -> parts; size = the task's haystack units


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    metric: str  # "all" / "part" (RULER string match), "f1" (token F1, with EM), "rouge" (against the full cache)
    max_new_tokens: int
    build: Builder
    units_per_token: float  # first guess of haystack units per prompt token, refined by measuring
    min_length: int = 256


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def _load_all() -> None:
    from . import fidelity, qa, ruler  # noqa: F401  (they register their tasks)


def task_groups() -> dict[str, list[str]]:
    _load_all()
    groups: dict[str, list[str]] = {}
    for t in TASKS.values():
        groups.setdefault(t.family, []).append(t.name)
    return groups


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from a comma list of names and groups ("ruler", "qa", "fidelity", "all")."""
    groups = task_groups()
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    out: list[str] = []
    for item in items:
        names = [n for g in groups.values() for n in g] if item == "all" else groups.get(item, [item])
        for name in names:
            if name not in TASKS:
                raise LookaheadKVError(f"unknown task {name!r}; choose from all, {', '.join(groups)}, "
                                       f"or {', '.join(TASKS)}")
            if name not in out:
                out.append(name)
    if not out:
        raise LookaheadKVError("no task given; e.g. --tasks ruler,qa")
    return out


def make_sample(task: str, length: int, seed: int, index: int, measure: Callable[[Sample], int]) -> Sample:
    """Sample `index` of `task`, fitted so that its prompt plus the answer fits in `length` tokens
    (RULER's rule: input + tokens to generate <= max sequence length). `measure` gives a sample's prompt tokens."""
    _load_all()
    t = TASKS[task]
    if length < t.min_length:
        raise LookaheadKVError(f"task {task} needs a length of at least {t.min_length} tokens, got {length}")
    target = length - t.max_new_tokens
    sid = f"{task}-{length}-s{seed}-{index}"

    def build(size: int) -> Sample:
        p = t.build(random.Random(f"{sid}"), size)
        return Sample(sid, task, t.family, p.context, p.query, list(p.answers), p.answer_prefix, t.metric,
                      t.max_new_tokens, 0, dict(p.meta))

    size = max(1, int(target * t.units_per_token))
    best = None
    last = None  # (size, tokens) of the previous step: tokens are close to affine in the size (secant steps)
    for _ in range(10):
        s = build(size)
        s.prompt_tokens = measure(s)
        if s.prompt_tokens <= target:
            best = s if best is None or s.prompt_tokens > best.prompt_tokens else best
            if s.prompt_tokens >= 0.96 * target:
                break
        goal = 0.98 * target
        if last is not None and last[0] != size and last[1] != s.prompt_tokens:
            slope = (s.prompt_tokens - last[1]) / (size - last[0])
            new = int(size + (goal - s.prompt_tokens) / slope) if slope > 0 else int(size * goal / s.prompt_tokens)
        else:
            new = int(size * goal / s.prompt_tokens)
        last = (size, s.prompt_tokens)
        size = max(1, new if new != size else size - 1 if s.prompt_tokens > target else size + 1)
    while best is None:  # still too long: shrink until it fits
        if size <= 1:
            raise LookaheadKVError(f"task {task} cannot fit a sample in {length} tokens")
        size = max(1, int(size * 0.9))
        s = build(size)
        s.prompt_tokens = measure(s)
        best = s if s.prompt_tokens <= target else None
    return best
