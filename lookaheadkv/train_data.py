"""Training prompts for the lookahead module, built offline from the TRAIN split of data.py only.

Five families, cycled in order, each prompt a context of a length drawn uniformly in [min_tokens, max_tokens]:
- squad: a SQuAD question over its paragraph hidden among paragraphs of other (train) articles;
- hotpotqa: a HotpotQA question over its ten paragraphs plus paragraphs of other (train) questions;
- instruct: an instruction over an essay excerpt (summarise, list the points, extract the numbers/names,
  explain a quoted sentence), answers that run long and draw on the whole text;
- retrieval: synthetic lookups with long exact answers: a planted multi-digit code in essay text, a table of
  key -> value entries (one asked), or all the "magic numbers" of one word (several values to list). Long
  exact answers are where query-based scoring fails (paper.md, "Observed here"): the answer's own attention
  walks along the value as it is written.
- The prompt is build_prompt()'s chat format, as at inference.

Nothing here reads the test split: lookaheadkv.data.split_of decides, by essay / article / question id.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from . import data
from .data import TokenCounter, fill_with_distractors
from .errors import LookaheadKVError
from .generate import build_prompt

FAMILIES = ("squad", "hotpotqa", "instruct", "retrieval")
SPLIT = "train"


@dataclass
class TrainPrompt:
    id: str
    family: str
    context: str
    question: str

    def text(self, tokenizer) -> str:
        return build_prompt(tokenizer, self.context, self.question)



def _sentences(rng: random.Random, target: int, count: TokenCounter) -> list[str]:
    """Consecutive sentences of train-split essays, from a random place, about `target` tokens."""
    essays = data.essays(SPLIT)
    names = sorted(essays)
    out, total = [], 0
    start = rng.randrange(len(names))
    for name in names[start:] + names[:start]:
        sents = re.split(r"(?<=[.!?])\s+", " ".join(essays[name].split()))
        first = rng.randrange(max(1, len(sents) // 2)) if not out else 0
        for s in sents[first:]:
            if total >= target:
                return out
            out.append(s)
            total += count(s) + 1
    return out


def _squad(i, rng, target, count):
    items = data.squad(SPLIT)
    q = items[rng.randrange(len(items))]
    pool = sorted({x["context"] for x in items if x["title"] != q["title"]})
    context = fill_with_distractors([q["context"]], pool, target, count, rng, candidates=400)
    return TrainPrompt(f"squad:{q['id']}", "squad", context, q["question"])


def _hotpotqa(i, rng, target, count):
    items = data.hotpotqa(SPLIT)
    q = items[rng.randrange(len(items))]
    others = [items[rng.randrange(len(items))] for _ in range(40)]
    pool = sorted({f"{t}: {p}" for o in others if o["id"] != q["id"] for t, p in o["paragraphs"]})
    gold = [f"{t}: {p}" for t, p in q["paragraphs"]]
    context = fill_with_distractors(gold, pool, target, count, rng, candidates=400)
    return TrainPrompt(f"hotpotqa:{q['id']}", "hotpotqa", context, q["question"])


def _instruct(i, rng, target, count):
    sents = _sentences(rng, target, count)
    quote = rng.choice([s for s in sents if 8 <= len(s.split()) <= 40] or sents)
    task = rng.choice([
        "Summarise the text above in five sentences.",
        "List the main points the text makes, one per line.",
        "Extract every person, company and number mentioned in the text, with what the text says about each.",
        f'Explain in your own words what the author means by: "{quote}"',
        "Write three questions a reader could answer from the text, each with its answer.",
        f'Which sentence comes right after "{quote}"? Quote it exactly.',
    ])
    return TrainPrompt(f"instruct:{i}", "instruct", " ".join(sents), task)


_WORDS: list[str] = []


def _words() -> list[str]:
    if not _WORDS:
        text = " ".join(data.essays(SPLIT).values()).lower()
        _WORDS.extend(sorted({w for w in re.findall(r"[a-z]{5,10}", text)}))
    return _WORDS


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (d := rng.randint(5, 10)) // 10, 10**d))


def _retrieval(i, rng, target, count):
    kind = rng.choice(["needle", "table", "multi"])
    words = _words()
    if kind == "needle":
        sents = _sentences(rng, target, count)
        thing = rng.choice(["access code", "serial number", "account number", "launch code", "room number"])
        name = " ".join(rng.sample(words, 2)).title()
        value = rng.choice([_number(rng), "-".join(_number(rng)[:4] for _ in range(rng.randint(2, 4)))])
        sents.insert(rng.randint(1, max(1, len(sents) - 1)), f"The {thing} of the {name} project is {value}.")
        question = f"What is the {thing} of the {name} project?"
        return TrainPrompt(f"retrieval:{i}", "retrieval", " ".join(sents), question)
    if kind == "table":
        lines, total = [], 0
        while total < target:
            key = "".join(rng.choices(string.ascii_lowercase + string.digits, k=8))
            val = rng.choice([_number(rng), " ".join(rng.sample(words, rng.randint(2, 5)))])
            line = f"Entry {key}: {val}"
            lines.append(line)
            total += count(line) + 1
        asked = rng.choice(lines).split(":")[0].removeprefix("Entry ")
        return TrainPrompt(f"retrieval:{i}", "retrieval", "\n".join(lines), f"What is the value of entry {asked}?")
    keys = rng.sample(words, 12)
    lines, total = [], 0
    while total < target:
        line = f"One of the special magic numbers for {rng.choice(keys)} is: {_number(rng)}."
        lines.append(line)
        total += count(line) + 1
    asked = rng.choice([k for k in keys if any(f"for {k} " in ln for ln in lines)])
    return TrainPrompt(f"retrieval:{i}", "retrieval", "\n".join(lines),
                       f"List all the special magic numbers for {asked} mentioned in the text.")


_BUILDERS = {"squad": _squad, "hotpotqa": _hotpotqa, "instruct": _instruct, "retrieval": _retrieval}


def training_prompts(tokenizer, n: int, min_tokens: int = 300, max_tokens: int = 3000,
                     families: Sequence[str] = FAMILIES, seed: int = 0) -> list[TrainPrompt]:
    """`n` training prompts from the train split, cycling through `families`. Deterministic per seed."""
    bad = set(families) - set(_BUILDERS)
    if bad or not families:
        raise LookaheadKVError(f"unknown training families {sorted(bad)}; choose from {', '.join(FAMILIES)}")
    if not 0 < min_tokens <= max_tokens:
        raise LookaheadKVError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    count = TokenCounter(tokenizer)
    return [_BUILDERS[families[i % len(families)]](i, rng, rng.randint(min_tokens, max_tokens), count)
            for i in range(n)]
