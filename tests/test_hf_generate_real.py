"""evicting() on the default model with its real weights: HF generate and pipelines give what our own
pipeline gives, for every method at budget 128 (slow: the model is fetched and converted once, then cached)."""

import threading

import pytest
import torch
from transformers import TextIteratorStreamer, pipeline

from lookaheadkv import METHODS, evicting, generate_ids, load_model
from lookaheadkv.decode import Sampling
from lookaheadkv.demo import document
from lookaheadkv.generate import build_prompt

pytestmark = pytest.mark.slow
QUESTION = "What is the access code for the archive room?"
NEW = 8


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct")


def context(chars: int = 700, fact: str = "The access code for the archive room is 482913.") -> str:
    return document(fact, depth=0.04)[:chars]  # the fact within the first ~500 characters


def encode(tok, ctx: str) -> torch.Tensor:
    return tok(build_prompt(tok, ctx, QUESTION), return_tensors="pt", add_special_tokens=False)["input_ids"]


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def options(model, name: str) -> dict:
    return {"draft_model": model, "k": 8} if name == "speckv" else {}  # SpecKV drafting with the target itself


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_inside_evicting_equals_generate_ids_at_budget_128(smollm2, name):
    model, tok = smollm2
    ids = encode(tok, context())
    assert ids.shape[1] > 180  # budget 128 really evicts
    with evicting(model, name, budget=128, **options(model, name)) as ev:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    ours, ev2, _ = generate_ids(model, ids, None, name, 128, Sampling(NEW), {tok.eos_token_id},
                                **options(model, name))
    assert until_eos(out[0, ids.shape[1]:].tolist(), tok.eos_token_id) == ours[0]
    assert ev.last.kept_per_layer == ev2.kept_per_layer


def test_budget_covering_the_prompt_is_plain_generate(smollm2):  # sampling and the rest: on the tiny model
    model, tok = smollm2
    ids = encode(tok, context())
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    with evicting(model, "snapkv", budget=ids.shape[1]):
        same = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(same, plain)


def test_streamed_text_equals_the_returned_text(smollm2):
    model, tok = smollm2
    ids = encode(tok, context())
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        with evicting(model, "lookahead", budget=128):
            result["out"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                           do_sample=False, streamer=streamer)

    worker = threading.Thread(target=run)
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    returned = tok.decode(result["out"][0, ids.shape[1]:], skip_special_tokens=True)
    assert streamed.strip() == returned.strip() and len(returned) > 10


def test_chat_pipeline_answers_as_our_generate(smollm2):
    model, tok = smollm2
    ctx = context()
    messages = [{"role": "user", "content": f"{ctx.strip()}\n\nAnswer the question using the text above.\n"
                                            f"Question: {QUESTION}"}]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    with evicting(model, "snapkv", budget=128) as ev:
        reply = pipe(messages, max_new_tokens=NEW, do_sample=False)[0]["generated_text"][-1]["content"]
    ours, _, _ = generate_ids(model, encode(tok, ctx), None, "snapkv", 128, Sampling(NEW), {tok.eos_token_id})
    assert reply.strip() == tok.decode(ours[0], skip_special_tokens=True).strip()
    assert ev.last.prompt_tokens == encode(tok, ctx).shape[1] and ev.last.kept_tokens == 128


def test_a_left_padded_batch_equals_single_runs(smollm2):
    model, tok = smollm2
    texts = [build_prompt(tok, context(550), QUESTION),
             build_prompt(tok, context(420, "The password for the staff wifi is BLUE-TIGER-42."),
                          "What is the password for the staff wifi?")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert not bool(enc["attention_mask"].all())
    with evicting(model, "snapkv", budget=128):
        batch = model.generate(**enc, max_new_tokens=NEW, do_sample=False)[:, enc["input_ids"].shape[1]:]
        for i, text in enumerate(texts):
            one = tok(text, return_tensors="pt", add_special_tokens=False)
            single = model.generate(**one, max_new_tokens=NEW, do_sample=False)[0, one["input_ids"].shape[1]:]
            assert until_eos(batch[i].tolist(), tok.eos_token_id) == until_eos(single.tolist(), tok.eos_token_id)
