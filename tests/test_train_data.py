"""Training prompts: every family builds, none holds test-split text, and a smaller set is a prefix of a larger."""

import re

import pytest

from lookaheadkv import data
from lookaheadkv.train_data import FAMILIES, training_prompts


class WordTokenizer:
    """Whitespace tokens: the builders only count them; no chat template, so prompts are plain text."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


@pytest.fixture(scope="module")
def built():
    tok = WordTokenizer()
    return tok, training_prompts(tok, 8 * len(FAMILIES), 200, 1500, seed=7)


def test_every_family_builds_prompts_near_their_length(built):
    tok, prompts = built
    assert [p.family for p in prompts[: len(FAMILIES)]] == list(FAMILIES)
    for p in prompts:
        n = len(p.text(tok).split())
        assert 100 < n < 3000, (p.family, n)
    chats = [p for p in prompts if p.family == "chat"]
    assert all(m["role"] == "user" for m in (c.messages[-1] for c in chats))
    assert any(len(c.messages) >= 3 for c in chats)  # earlier turns answered


def test_no_test_split_text_is_in_any_training_prompt(built):
    tok, prompts = built
    texts = [p.text(tok) for p in prompts]
    squad_test = {x["context"] for x in data.squad("test")}
    hotpot_test = {p for x in data.hotpotqa("test") for _, p in x["paragraphs"]}
    essay_test = [s for e in data.essays("test").values()
                  for s in re.split(r"(?<=[.!?])\s+", " ".join(e.split())) if len(s) > 120]
    code_test = [src[:300] for src in data.code_files("test").values()]
    assert squad_test and hotpot_test and essay_test and code_test
    for t in texts:
        assert not any(c in t for c in squad_test)
        assert not any(p in t for p in hotpot_test if len(p) > 80)
        assert not any(s in t for s in essay_test)
        assert not any(c in t for c in code_test)
    used = {p.id.split(":", 1)[1] for p in prompts if p.family in ("squad", "fewshot", "chat")}
    squad_ids = {x["id"]: x["title"] for x in data.squad()}
    assert used and all(data.split_of("squad", squad_ids[i]) == "train" for i in used)


def test_a_smaller_set_is_a_prefix_of_a_larger_one():
    tok = WordTokenizer()
    small = training_prompts(tok, 5, 200, 600, seed=2)
    large = training_prompts(tok, 9, 200, 600, seed=2)
    assert [p.text(tok) for p in small] == [p.text(tok) for p in large[:5]]
    assert training_prompts(tok, 3, 200, 600, seed=3)[0].text(tok) != small[0].text(tok)


def test_uuid_records_ask_records_that_are_there():
    tok = WordTokenizer()
    keyed = [p for p in training_prompts(tok, 80, 200, 600, families=("retrieval",), seed=1)
             if p.context.startswith("Record ")]
    assert len(keyed) >= 10
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    for p in keyed:
        records = dict(re.findall(rf"Record ({uuid}) has the token ({uuid})\.", p.context))
        assert len(records) == p.context.count("\n") + 1  # every line a record, keys distinct
        asked = re.findall(uuid, p.question)
        assert 1 <= len(asked) <= 3 and all(a in records for a in asked)
