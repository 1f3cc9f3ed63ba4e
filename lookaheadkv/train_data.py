"""Training prompts for the lookahead module, built offline from the TRAIN split of data.py only.

Eight families, cycled in order; each prompt's context length is drawn log-uniformly in [min_tokens,
max_tokens] (every scale is present, the long ones included, at a cost in tokens the short ones keep low):
- squad: a SQuAD question over its paragraph hidden among paragraphs of other (train) articles;
- hotpotqa: a HotpotQA (multi-hop) question over its ten paragraphs plus paragraphs of other questions (only
  questions that share no paragraph with a test-split question: Wikipedia paragraphs recur across questions);
- instruct: long-form instructions over an essay excerpt (summarise, list, extract, explain, rewrite, explain
  step by step, continue a quote), answers that run long and draw on the whole text;
- retrieval: synthetic lookups with long exact answers: a planted multi-digit code in essay text, a table of
  key -> value entries (one asked), all the "magic numbers" of one word (several values), or records whose keys
  and values are both UUIDs (one to three asked: no word of the question ranks the value). Long exact
  answers are where query-based scoring fails (paper.md, "Observed here"): the answer's own attention walks
  along the value as it is written;
- multifact: several facts planted in essay text, asked together (several values in one answer) or through a
  chain of references (multi-hop: "X uses the same code as Y", "Y's code is ...");
- fewshot: solved SQuAD examples (paragraph, question, answer), then a new paragraph and question;
- code: Python source files (networkx), with a question about a function or class in them;
- chat: a multi-turn chat over SQuAD paragraphs: earlier questions answered (gold answers), then a new one.
The prompt is the model's chat format, as at inference (generate.build_prompt, or the chat's messages).

Nothing here reads the test split: lookaheadkv.data.split_of decides, by essay / article / question / file.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import random
import re
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import data
from .data import TokenCounter, fill_with_distractors
from .errors import LookaheadKVError
from .generate import build_prompt

FAMILIES = ("squad", "hotpotqa", "instruct", "retrieval", "multifact", "fewshot", "code", "chat")
SPLIT = "train"


@dataclass
class TrainPrompt:
    id: str
    family: str
    context: str
    question: str
    messages: list[dict] = field(default_factory=list)  # a whole chat, when the prompt is not context + question

    def text(self, tokenizer) -> str:
        if not self.messages:
            return build_prompt(tokenizer, self.context, self.question)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in self.messages) + "\nassistant:"


def _sentences(rng: random.Random, target: int, count: TokenCounter) -> list[str]:
    """Consecutive sentences of train-split essays, from a random place, about `target` tokens."""
    essays = data.essays(SPLIT)
    names = sorted(essays)
    out, total = [], 0
    start = rng.randrange(len(names))
    while total < target:  # long targets go round the essays more than once
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
    pool = _squad_pool(q["title"])
    context = fill_with_distractors([q["context"]], pool, target, count, rng, candidates=400)
    return TrainPrompt(f"squad:{q['id']}", "squad", context, q["question"])


def _squad_pool(title: str) -> list[str]:
    return [c for t, cs in _squad_contexts().items() if t != title for c in cs]


_SQUAD_CONTEXTS: dict[str, list[str]] = {}


def _squad_contexts() -> dict[str, list[str]]:
    """{article title: its distinct paragraphs}, train split (built once: 20K prompts reuse it)."""
    if not _SQUAD_CONTEXTS:
        for x in data.squad(SPLIT):
            paras = _SQUAD_CONTEXTS.setdefault(x["title"], [])
            if x["context"] not in paras:
                paras.append(x["context"])
    return _SQUAD_CONTEXTS


_HOTPOT: list[dict] = []


def _hotpot_train() -> list[dict]:
    """Train-split HotpotQA questions none of whose paragraphs is also a paragraph of a test question (the
    split is by question, and Wikipedia paragraphs recur across questions)."""
    if not _HOTPOT:
        test = {p for x in data.hotpotqa("test") for _, p in x["paragraphs"]}
        _HOTPOT.extend(x for x in data.hotpotqa(SPLIT) if not any(p in test for _, p in x["paragraphs"]))
    return _HOTPOT


def _hotpotqa(i, rng, target, count):
    items = _hotpot_train()
    q = items[rng.randrange(len(items))]
    others = [items[rng.randrange(len(items))] for _ in range(10 + target // 100)]
    pool = sorted({f"{t}: {p}" for o in others if o["id"] != q["id"] for t, p in o["paragraphs"]})
    gold = [f"{t}: {p}" for t, p in q["paragraphs"]]
    context = fill_with_distractors(gold, pool, target, count, rng, candidates=400)
    return TrainPrompt(f"hotpotqa:{q['id']}", "hotpotqa", context, q["question"])


def _instruct(i, rng, target, count):
    sents = _sentences(rng, target, count)
    quote = rng.choice([s for s in sents if 8 <= len(s.split()) <= 40] or sents)
    task = rng.choice([
        "Summarise the text above in five sentences.",
        "Write a detailed summary of the text above, one paragraph for each of its main parts.",
        "List the main points the text makes, one per line.",
        "Extract every person, company and number mentioned in the text, with what the text says about each.",
        f'Explain in your own words what the author means by: "{quote}"',
        f'Explain step by step how the author arrives at this claim: "{quote}"',
        f'Rewrite the passage around this sentence in plain, simple language: "{quote}"',
        "Write three questions a reader could answer from the text, each with its answer.",
        f'Which sentence comes right after "{quote}"? Quote it exactly.',
        f'Continue the text from "{quote}", quoting the next three sentences exactly.',
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


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _code_value(rng: random.Random) -> str:
    return rng.choice([_number(rng), "-".join(_number(rng)[:4] for _ in range(rng.randint(2, 4))),
                       "".join(rng.choices(string.ascii_uppercase + string.digits, k=rng.randint(6, 12))),
                       _uuid(rng)])


def _retrieval(i, rng, target, count):
    # UUID records twice as often: random keys are the hardest match (a 1.5B module's scores missed them entirely)
    kind = rng.choices(["needle", "table", "multi", "keyed"], weights=[1, 1, 1, 2])[0]
    words = _words()
    if kind == "needle":
        sents = _sentences(rng, target, count)
        thing = rng.choice(["access code", "serial number", "account number", "launch code", "room number"])
        name = " ".join(rng.sample(words, 2)).title()
        value = _code_value(rng)
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
    if kind == "keyed":  # random-token keys and values (UUIDs): nothing in the question's words ranks the value
        keys, lines, total = [], [], 0
        while total < target:
            keys.append(_uuid(rng))
            lines.append(f"Record {keys[-1]} has the token {_uuid(rng)}.")
            total += count(lines[-1]) + 1
        asked = rng.sample(keys, min(len(keys), rng.choice([1, 1, 2, 3])))
        question = (f"What is the token of record {asked[0]}?" if len(asked) == 1 else
                    f"What are the tokens of the records {', '.join(asked)}? Give each record's token.")
        return TrainPrompt(f"retrieval:{i}", "retrieval", "\n".join(lines), question)
    keys = rng.sample(words, 12)
    lines, total = [], 0
    while total < target:
        line = f"One of the special magic numbers for {rng.choice(keys)} is: {_number(rng)}."
        lines.append(line)
        total += count(line) + 1
    asked = rng.choice([k for k in keys if any(f"for {k} " in ln for ln in lines)])
    return TrainPrompt(f"retrieval:{i}", "retrieval", "\n".join(lines),
                       f"List all the special magic numbers for {asked} mentioned in the text.")


def _multifact(i, rng, target, count):
    """Several planted facts: asked together (a list of values), or reached through a chain of references."""
    sents = _sentences(rng, target, count)
    words = _words()
    names = [w.title() for w in rng.sample(words, 6)]
    thing = rng.choice(["access code", "budget", "launch date code", "badge number", "server address"])
    facts: list[str] = []
    if rng.random() < 0.5:
        values = {n: _code_value(rng) for n in names}
        facts = [f"The {thing} of the {n} team is {v}." for n, v in values.items()]
        asked = rng.sample(names, rng.randint(2, 4))
        question = f"List the {thing} of each of these teams: {', '.join(asked)}."
    else:
        hops = rng.randint(2, 4)
        chain = names[: hops + 1]
        facts = [f"The {thing} of the {chain[-1]} team is {_code_value(rng)}."]
        facts += [f"The {chain[k]} team uses the same {thing} as the {chain[k + 1]} team." for k in range(hops)]
        facts += [f"The {thing} of the {n} team is {_code_value(rng)}." for n in names[hops + 1:]]
        question = f"What is the {thing} of the {chain[0]} team? Explain which facts lead to it."
    for f in rng.sample(facts, len(facts)):
        sents.insert(rng.randint(0, len(sents)), f)
    return TrainPrompt(f"multifact:{i}", "multifact", " ".join(sents), question)


def _fewshot(i, rng, target, count):
    items = data.squad(SPLIT)
    q = items[rng.randrange(len(items))]
    final = f"Text: {q['context']}\nQuestion: {q['question']}\nAnswer:"
    shots, total, misses = [], count(final) + 20, 0
    while total < target and misses < 20 and len(shots) < 200:
        ex = items[rng.randrange(len(items))]
        shot = f"Text: {ex['context']}\nQuestion: {ex['question']}\nAnswer: {ex['answers'][0]}"
        if ex["title"] == q["title"] or total + count(shot) + 2 > target:  # never past the target length
            misses += 1
            continue
        shots.append(shot)
        total, misses = total + count(shot) + 2, 0
    user = ("Answer each question with a short span from its text, as in the examples.\n\n"
            + "\n\n".join(shots) + "\n\n" + final)
    return TrainPrompt(f"fewshot:{q['id']}", "fewshot", "", "", [{"role": "user", "content": user}])


def _definitions(source: str) -> list[tuple[str, str]]:
    """(kind, name) of the functions and classes defined in a source file."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [("class" if isinstance(n, ast.ClassDef) else "function", n.name) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def _code(i, rng, target, count):
    files = data.code_files(SPLIT)
    names = sorted(files)
    first = rng.randrange(len(names))
    parts, total, defs = [], 0, []
    for name in names[first:] + names[:first]:
        text = files[name]
        n = count(text)
        if parts and total + n > target:
            continue
        if n > target:  # one long file: its first `target` tokens, at a line break
            text = text[: max(200, int(len(text) * target / n))].rsplit("\n", 1)[0]
        parts.append(f"# File: networkx/{name}\n{text}")
        defs += _definitions(text)
        total += count(parts[-1])
        if total >= 0.9 * target:
            break
    if not defs:
        question = "Explain what the code above does, file by file."
    else:
        kind, name = rng.choice(defs)
        question = rng.choice([
            f"What does the {kind} `{name}` do? Explain step by step.",
            f"List the parameters of `{name}`, with their default values and what each one is for.",
            f"Which other functions or classes does `{name}` use?",
            f"Write a short docstring for `{name}`.",
            f"What does `{name}` return, and in which cases does it raise an error?",
            f"Rewrite `{name}` in a simpler way and explain the change.",
        ])
    return TrainPrompt(f"code:{i}", "code", "\n\n".join(parts), question)


_SQUAD_BY_TITLE: dict[str, list[dict]] = {}


def _chat(i, rng, target, count):
    """Turns of questions on one article: their paragraphs among distractors, earlier turns answered with the
    gold answers, the last one open."""
    if not _SQUAD_BY_TITLE:
        for x in data.squad(SPLIT):
            _SQUAD_BY_TITLE.setdefault(x["title"], []).append(x)
    items = data.squad(SPLIT)
    q = items[rng.randrange(len(items))]
    same = _SQUAD_BY_TITLE[q["title"]]
    turns = [q] + rng.sample(same, min(len(same), rng.randint(1, 4)))
    turns = list({t["id"]: t for t in turns}.values())
    gold = list(dict.fromkeys(t["context"] for t in turns))
    context = fill_with_distractors(gold, _squad_pool(q["title"]), target, count, rng, candidates=400)
    rng.shuffle(turns)
    messages = [{"role": "user", "content": f"{context}\n\nI have some questions about the text above.\n"
                                            f"{turns[0]['question']}"}]
    for prev, nxt in zip(turns, turns[1:]):
        messages += [{"role": "assistant", "content": prev["answers"][0]}, {"role": "user", "content": nxt["question"]}]
    return TrainPrompt(f"chat:{turns[-1]['id']}", "chat", "", "", messages)


_BUILDERS = {"squad": _squad, "hotpotqa": _hotpotqa, "instruct": _instruct, "retrieval": _retrieval,
             "multifact": _multifact, "fewshot": _fewshot, "code": _code, "chat": _chat}


def training_prompts(tokenizer, n: int, min_tokens: int = 300, max_tokens: int = 3000,
                     families: Sequence[str] = FAMILIES, seed: int = 0, progress: bool = False) -> list[TrainPrompt]:
    """`n` training prompts from the train split, cycling through `families`. Deterministic per seed, and each
    prompt depends only on (seed, its index): a smaller set is a prefix of a larger one."""
    bad = set(families) - set(_BUILDERS)
    if bad or not families:
        raise LookaheadKVError(f"unknown training families {sorted(bad)}; choose from {', '.join(FAMILIES)}")
    if not 0 < min_tokens <= max_tokens:
        raise LookaheadKVError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    count = TokenCounter(tokenizer)
    lo, hi = math.log(min_tokens), math.log(max_tokens)
    out = []
    for i in tqdm(range(n), desc="prompts", unit="prompt", disable=not progress):
        rng = random.Random(f"{seed}:{i}")  # one generator per prompt: the first k of n are the k-prompt set
        out.append(_BUILDERS[families[i % len(families)]](i, rng, round(math.exp(rng.uniform(lo, hi))), count))
    return out


def save_prompts(path: str | Path, ids: Sequence[Sequence[int]], families: Sequence[str], options: dict) -> Path:
    """Token ids of a prompt set in one safetensors file (flat ids + offsets; families and the options that
    built it in its metadata), so the GPU machine trains on exactly the prompts made and checked here."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.int32)
    if len(flat) and int(flat.max()) < 1 << 16:  # half the bytes (most vocabularies); xz then takes it to ~1/8
        flat = flat.to(torch.uint16)
    offsets = torch.tensor([0] + list(itertools.accumulate(len(x) for x in ids)), dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ids": flat, "offsets": offsets}, str(tmp),
              metadata={"families": json.dumps(list(families)), "options": json.dumps(options)})
    tmp.rename(path)
    return path


def load_prompts(path: str | Path) -> tuple[list, list[str], dict]:
    """(token ids per prompt, families, the options that built them) from save_prompts' file."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            flat, offsets = f.get_tensor("ids").to(torch.long), f.get_tensor("offsets").tolist()
        families, options = json.loads(meta["families"]), json.loads(meta["options"])
    except Exception as e:  # safetensors raises several types on a file that is not one of ours
        raise LookaheadKVError(f"{path} is not a prompt file made by `lookaheadkv prompts` "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return [flat[a:b] for a, b in zip(offsets, offsets[1:])], families, options
