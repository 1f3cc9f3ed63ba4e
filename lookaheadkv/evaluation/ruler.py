"""RULER's 13 synthetic tasks (Hsieh et al., 2024), written from the task descriptions in
`nvidia-long-context-eval` 26.3 (long_context_eval/data/synthetic): needles in a haystack (single, multi-key,
multi-value, multi-query), variable tracking, common and frequent words extraction, single- and multi-hop QA.

Same configurations as RULER's standard set; differences, on purpose: essay haystacks come from the TEST
split of the Paul Graham essays only (data.essays("test")), cut at a random sentence per sample; sentences
are split by a regular expression (RULER calls nltk, whose data is not available here); the answer budgets
are shorter (the answers are short, and decoding every method x budget is the cost of the run).
Scoring is RULER's string match: "all" references (needles, VT, CWE, FWE) or any one ("part", QA).
Word lists are wonderwords' (RULER draws from them), read from its wheel into the cache.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from functools import cache

from .. import data
from ..pypi import fetch_tree, home
from .tasks import Parts, Task, register

WONDERWORDS = ("wonderwords==3.0.1", "wonderwords/assets")
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # 40 needle depths, 0..100 %


@cache
def word_lists() -> dict[str, list[str]]:
    d = fetch_tree(*WONDERWORDS, home() / "data" / "wonderwords")
    return {k: [w.strip() for w in (d / f"{k}list.txt").read_text(encoding="utf-8").splitlines() if w.strip()]
            for k in ("noun", "adjective", "verb")}


@cache
def essay_sentences() -> list[str]:
    """Sentences of the test-split essays, in file order, whitespace normalised."""
    text = " ".join(" ".join(t.split()) for _, t in sorted(data.essays("test").items()))
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def essay_window(rng: random.Random, n: int) -> list[str]:
    """n consecutive test-essay sentences from a random start (wrapping around)."""
    sents = essay_sentences()
    start = rng.randrange(len(sents))
    return [sents[(start + i) % len(sents)] for i in range(n)]


# ----------------------------------------------------------------------------------------------------- needles

def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        w = word_lists()
        return f"{rng.choice(w['adjective'])}-{rng.choice(w['noun'])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


def _needle(kind_v: str, key: str, value: str) -> str:
    return f"One of the special magic {kind_v} for {key} is: {value}."


def niah(haystack: str, kind_k: str, kind_v: str, num_k: int = 1, num_v: int = 1, num_q: int = 1):
    """A needle-in-a-haystack builder: num_k keys, num_v values each, num_q keys asked about."""
    num_k = max(num_k, num_q)

    def build(rng: random.Random, size: int) -> Parts:
        keys: list[str] = []
        while len(keys) < num_k:
            k = _random(kind_k, rng)
            if k not in keys:
                keys.append(k)
        values = [[_random(kind_v, rng) for _ in range(num_v)] for _ in keys]
        needles = [_needle(kind_v, k, v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        if haystack == "essay":
            sents = essay_window(rng, size)
            cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
            for j, (cut, nd) in enumerate(zip(cuts, needles)):
                sents.insert(cut + j, nd)
            context = " ".join(sents)
        else:
            if haystack == "repeat":
                lines = [REPEAT] * size
            else:  # "needle": the haystack is made of needles with other keys
                taken = set(keys)
                lines = []
                while len(lines) < size:
                    k = _random(kind_k, rng)
                    if k not in taken:
                        taken.add(k)
                        lines.append(_needle(kind_v, k, _random(kind_v, rng)))
            for idx, nd in zip(sorted(rng.sample(range(size + 1), len(needles)), reverse=True), needles):
                lines.insert(idx, nd)
            context = "\n".join(lines)
        asked = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in asked]
        answers = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        if num_q * num_v == 1:
            kind = kind_v[:-1]
            intro = (f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
                     f"I will quiz you about the {kind} afterwards.")
            question = f"What is the special magic {kind} for {query} mentioned in the provided text?"
            prefix = f"The special magic {kind} for {query} mentioned in the provided text is"
        else:
            intro = (f"Some special magic {kind_v} are hidden within the following text. Make sure to memorize "
                     f"them. I will quiz you about the {kind_v} afterwards.")
            question = f"What are all the special magic {kind_v} for {query} mentioned in the provided text?"
            prefix = f"The special magic {kind_v} for {query} mentioned in the provided text are"
        return Parts(f"{intro}\n{context}", f"\n{question}", answers, prefix, {"keys": queries})

    return build


# units of haystack per prompt token: essay sentences ~25 tokens, repeated lines ~22, needle lines ~20 / ~60
_NIAH = {
    "niah_single_1": (niah("repeat", "words", "numbers"), 1 / 22, 32),
    "niah_single_2": (niah("essay", "words", "numbers"), 1 / 28, 32),
    "niah_single_3": (niah("essay", "words", "uuids"), 1 / 28, 48),
    "niah_multikey_1": (niah("essay", "words", "numbers", num_k=4), 1 / 28, 32),
    "niah_multikey_2": (niah("needle", "words", "numbers"), 1 / 22, 32),
    "niah_multikey_3": (niah("needle", "uuids", "uuids"), 1 / 70, 48),
    "niah_multivalue": (niah("essay", "words", "numbers", num_v=4), 1 / 28, 64),
    "niah_multiquery": (niah("essay", "words", "numbers", num_q=4), 1 / 28, 64),
}
for _name, (_build, _upt, _new) in _NIAH.items():
    register(Task(_name, "ruler", "all", _new, _build, _upt))


# --------------------------------------------------------------------------------------------- variable tracking

def _chain(rng: random.Random, hops: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names:
            names.append(v)
    lines = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    lines += [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, lines


def _vt_text(rng: random.Random, noise: int, hops: int) -> tuple[str, list[str], str]:
    names, chain = _chain(rng, hops)
    sents = [REPEAT] * noise
    for j, pos in enumerate(sorted(rng.sample(range(noise + 1), len(chain)))):
        sents.insert(pos + j, chain[j] + ".")
    return " ".join(sents), names, chain[0].split("=")[-1].strip()


def _vt_question(value: str) -> str:
    return f"Question: Find all variables that are assigned the value {value} in the text above."


def _vt_prefix(hops: int, value: str) -> str:
    return (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
            f"are assigned the value {value}, they are:")


def variable_tracking(rng: random.Random, size: int, hops: int = 4) -> Parts:
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    ex_text, ex_names, ex_value = _vt_text(rng, 8, hops)  # RULER's one worked example
    example = f"{intro}\n\n{ex_text}\n{_vt_question(ex_value)} {_vt_prefix(hops, ex_value)} {' '.join(ex_names)}"
    text, names, value = _vt_text(rng, size, hops)
    return Parts(f"{example}\n\n{intro}\n\n{text}", f"\n{_vt_question(value)}", names, _vt_prefix(hops, value),
                 {"value": value})


register(Task("vt", "ruler", "all", 30, variable_tracking, 1 / 22))


# ------------------------------------------------------------------------------------ common words extraction

@cache
def _cwe_words() -> list[str]:
    w = word_lists()
    words = sorted(set(w["noun"] + w["adjective"] + w["verb"]))
    random.Random(42).shuffle(words)
    return words


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(rng: random.Random, n_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
    picked = rng.sample(_cwe_words(), n_words)
    top, rest = picked[:10], picked[10:]
    listed = top * common + rest * uncommon
    rng.shuffle(listed)
    return _numbered(listed), top


def common_words(rng: random.Random, size: int) -> Parts:
    """size = number of uncommon words; the 10 common words appear 30 times each, the others 3 times."""
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.")
    question = "Question: What are the 10 most common words in the above list?"
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    ex_list, ex_top = _cwe_list(rng, 40, 10, 3)
    text, top = _cwe_list(rng, 10 + size, 30, 3)
    example = f"{intro}\n{ex_list}\n{question} {prefix} {_numbered(ex_top)}"
    return Parts(f"{example}\n{intro}\n{text}", f"\n{question}", top, prefix)


register(Task("cwe", "ruler", "all", 64, common_words, 1 / 16, min_length=2048))


# ---------------------------------------------------------------------------------- frequent words extraction

ZETA2 = 1.6449340668482264  # zeta(2) = pi^2 / 6


def frequent_words(rng: random.Random, size: int, alpha: float = 2.0, vocab_size: int = 80) -> Parts:
    """Coded words with Zipf(alpha) counts; the most frequent one is '...' noise; the next three are the answer.
    size = total words drawn."""
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    order = sorted(vocab)
    rng.shuffle(order)
    order[0] = "..."
    words = [w for k, w in enumerate(order, start=1) for _ in range(int(size * k ** -alpha / ZETA2))]
    rng.shuffle(words)
    intro = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words.")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Parts(f"{intro} {' '.join(words)}", f"\n{question}", order[1:4], prefix)


register(Task("fwe", "ruler", "all", 32, frequent_words, 1 / 2.2))


# ------------------------------------------------------------------------------------------------------ QA

_QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output " \
                  "any other words."


@cache
def _qa_pool(dataset: str) -> tuple[list[dict], list[str]]:
    """(test questions with their gold documents, every test document) for squad or hotpotqa."""
    if dataset == "squad":
        items = [{"q": x["question"], "a": x["answers"], "gold": [x["context"]]} for x in data.squad("test")]
    else:
        items = [{"q": x["question"], "a": [x["answer"]], "gold": [f"{t}\n{p}" for t, p in x["paragraphs"]]}
                 for x in data.hotpotqa("test")]
    docs = sorted({d for x in items for d in x["gold"]})
    return items, docs


def ruler_qa(dataset: str):
    def build(rng: random.Random, size: int) -> Parts:
        items, docs = _qa_pool(dataset)
        item = items[rng.randrange(len(items))]
        gold = set(item["gold"])
        chosen = list(item["gold"])
        while len(chosen) < max(size, len(gold)):
            d = docs[rng.randrange(len(docs))]
            if d not in gold and d not in chosen:
                chosen.append(d)
        rng.shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
        return Parts(f"{_QA_INSTRUCTION}\n\nThe following are given documents.\n\n{context}",
                     f"\n\n{_QA_INSTRUCTION}\n\nQuestion: {item['q']}", item["a"], "Answer:")

    return build


register(Task("qa_1", "ruler", "part", 32, ruler_qa("squad"), 1 / 170))
register(Task("qa_2", "ruler", "part", 32, ruler_qa("hotpotqa"), 1 / 110))
