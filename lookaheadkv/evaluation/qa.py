"""Long-document QA in the style of LongBench (Bai et al., 2024), from the TEST split only.

- qa_single_doc: one long document: the SQuAD article that holds the answer, its paragraphs in order, between
  whole distractor articles (other test-split articles), up to the target length. Like LongBench's
  single-document QA (NarrativeQA, Qasper, MultiFieldQA): one long text, one short answer.
- qa_multi_doc: HotpotQA's distractor set (2 supporting + 8 distractor paragraphs) plus paragraphs of other
  test-split questions, as numbered passages, shuffled. Like LongBench's HotpotQA.

Scored by token F1 (the task score) and exact match, the best over the gold answers.
"""

from __future__ import annotations

import random
from functools import cache

from .. import data
from .tasks import Parts, Task, register

_BRIEF = "only give me the answer and do not output any other words."


@cache
def _articles() -> dict[str, list[str]]:
    """SQuAD test articles: title -> paragraphs in order."""
    out: dict[str, list[str]] = {}
    for x in data.squad("test"):
        paras = out.setdefault(x["title"], [])
        if x["context"] not in paras:
            paras.append(x["context"])
    return out


def single_doc(rng: random.Random, size: int) -> Parts:
    """size = number of paragraphs (the answer's article first counted whole)."""
    items = data.squad("test")
    item = items[rng.randrange(len(items))]
    arts = _articles()
    others = sorted(t for t in arts if t != item["title"])
    rng.shuffle(others)
    blocks = [arts[item["title"]]]
    total = len(blocks[0])
    for t in others:
        if total >= size:
            break
        blocks.append(arts[t])
        total += len(arts[t])
    rng.shuffle(blocks)
    paras = [p for b in blocks for p in b][: max(size, 1)]
    if item["context"] not in paras:  # cut off at the end: keep the answer's paragraph in place of the last one
        paras[-1] = item["context"]
    text = "\n\n".join(paras)
    return Parts(f"Read the following text and answer briefly.\n\n{text}",
                 f"\n\nNow, answer the question based on the above text, {_BRIEF}\n\nQuestion: {item['question']}",
                 item["answers"], "Answer:", {"title": item["title"]})


@cache
def _hotpot_paragraphs() -> list[str]:
    return sorted({f"{t}\n{p}" for x in data.hotpotqa("test") for t, p in x["paragraphs"]})


def multi_doc(rng: random.Random, size: int) -> Parts:
    """size = number of passages (at least HotpotQA's own ten)."""
    items = data.hotpotqa("test")
    item = items[rng.randrange(len(items))]
    own = [f"{t}\n{p}" for t, p in item["paragraphs"]]
    pool = _hotpot_paragraphs()
    chosen = list(own)
    while len(chosen) < size:
        p = pool[rng.randrange(len(pool))]
        if p not in chosen:
            chosen.append(p)
    rng.shuffle(chosen)
    passages = "\n\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(chosen))
    instruction = f"Answer the question based on the given passages, {_BRIEF}"
    return Parts(f"{instruction}\n\nThe following are given passages.\n\n{passages}",
                 f"\n\n{instruction}\n\nQuestion: {item['question']}", [item["answer"]], "Answer:",
                 {"supporting": item["supporting"]})


register(Task("qa_single_doc", "qa", "f1", 32, single_doc, 1 / 170, min_length=1024))
register(Task("qa_multi_doc", "qa", "f1", 32, multi_doc, 1 / 110, min_length=2048))
