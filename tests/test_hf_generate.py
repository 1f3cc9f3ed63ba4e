"""`evicting()` inside Hugging Face generate and pipelines, on tiny random-weight models (float64): the same
tokens as our own pipeline, every generate feature, stats, memory, and the hooks' clean exit."""

import gc
import threading
import weakref

import pytest
import torch
from conftest import left_pad, tiny_model, tiny_tokenizer
from test_lookahead import trained_like
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, TextStreamer, pipeline

from lookaheadkv import METHODS, EvictableCache, LookaheadKVError, evicting, generate_ids
from lookaheadkv.decode import Sampling
from lookaheadkv.prefill import _cache_kw

L, BUDGET = 70, 40  # prompt length and a budget that really evicts


@pytest.fixture(scope="module")
def model():
    m = tiny_model()
    trained_like(m)  # a lookahead module whose LoRA changes the rows
    return m


def prompt(n: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def gen(model, ids, n=12, mask=None, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                          eos_token_id=kw.pop("eos_token_id", None), pad_token_id=0, **kw)


def options(name: str) -> dict:
    extra = {"speckv": {"draft_model": tiny_model(seed=7)}, "laq": {"draft_budget": 40}}
    return {"window": 8, **extra.get(name, {})} if name not in ("lookahead",) else {}


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_inside_evicting_equals_generate_ids(model, name):
    ids = prompt()
    with evicting(model, name, budget=BUDGET, **options(name)) as ev:
        hf = gen(model, ids)[0, L:].tolist()
    ours, ev2, _ = generate_ids(model, ids, None, name, BUDGET, Sampling(12), set(), **options(name))
    assert hf == ours[0]
    assert ev.last.kept_per_layer == ev2.kept_per_layer
    if name != "full":
        assert ev.last.kv_bytes_kept < ev.last.kv_bytes_full


def test_eviction_changes_what_is_generated(model):
    ids = prompt()
    full = gen(model, ids)[0, L:].tolist()
    changed = []
    for name in ("snapkv", "h2o", "streamingllm", "knorm"):
        with evicting(model, name, budget=16, window=4):
            changed.append(gen(model, ids)[0, L:].tolist() != full)
    assert any(changed)  # so the equalities above compare real evictions, not the full cache


FEATURES = {
    "greedy": {},
    "sampling": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "repetition_penalty": dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    "min_new_tokens": dict(min_new_tokens=10, eos_token_id=None),  # eos set per test below
}


def run_feature(model, ids, feature, n=12, eos=None):
    kw = dict(FEATURES[feature])
    if feature == "min_new_tokens":
        kw["eos_token_id"] = eos
    torch.manual_seed(11)
    return gen(model, ids, n, **kw)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_budget_covering_the_prompt_is_plain_generate(model, feature):
    ids = prompt()
    eos = gen(model, ids, 3)[0, L + 1].item()  # for min_new_tokens: a token it would otherwise end on early
    plain = run_feature(model, ids, feature, eos=eos)
    with evicting(model, "snapkv", budget=L):
        assert torch.equal(run_feature(model, ids, feature, eos=eos), plain)


def masked_generate(model, ids, keep, feature, n=12, eos=None):
    """The reference for eviction under any generate feature: generate 1 token from the full prompt, then
    continue (same random stream) from the full cache with every slot but `keep` hidden by the attention
    mask, at the true positions. StreamingLLM keeps the same slots in every layer and head, so this is
    exactly what its eviction must give."""
    kw = dict(FEATURES[feature])
    if feature == "min_new_tokens":
        kw["eos_token_id"] = eos
    torch.manual_seed(11)
    first = gen(model, ids, 1, return_dict_in_generate=True, **kw)
    cache = first.past_key_values if getattr(first, "past_key_values", None) is not None else first.cache
    if feature == "min_new_tokens":
        kw["min_new_tokens"] -= 1
    mask = torch.zeros(1, L + 1, dtype=torch.long)
    mask[0, keep], mask[0, L] = 1, 1
    return gen(model, first.sequences, n - 1, mask=mask, position_ids=torch.arange(L + 1)[None],
               **{_cache_kw(model): cache}, **kw)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_feature_after_eviction_equals_the_masked_full_model(model, feature):
    ids = prompt(seed=5)
    keep = torch.cat([torch.arange(4), torch.arange(L - 20, L)])  # 4 sinks + the 20 most recent
    with evicting(model, "streamingllm", budget=24, sinks=4):
        eos = gen(model, ids, 3)[0, L + 1].item()  # for min_new_tokens: a token the evicted run would end on
        ours = run_feature(model, ids, feature, eos=eos)
    ref = masked_generate(model, ids, keep, feature, eos=eos)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, run_feature(model, ids, feature, eos=eos))  # and not the full cache's output


class StopOn(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_stop_an_evicted_generation(model):
    ids = prompt()
    with evicting(model, "snapkv", budget=BUDGET, window=8):
        free = gen(model, ids, 16)[0, L:].tolist()
        stop = free[5]
        cut = gen(model, ids, 16, stopping_criteria=StoppingCriteriaList([StopOn(stop)]))[0, L:].tolist()
    assert cut == free[: free.index(stop) + 1]


class Capture(TextStreamer):
    def __init__(self, tok):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.text = ""

    def on_finalized_text(self, text, stream_end=False):
        self.text += text


def test_streamers_stream_the_returned_text(model):
    tok = tiny_tokenizer()
    ids = prompt()
    with evicting(model, "snapkv", budget=BUDGET, window=8):
        streamer = Capture(tok)
        out = gen(model, ids, streamer=streamer)
        returned = tok.decode(out[0, L:], skip_special_tokens=True)
        it = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=gen, args=(model, ids), kwargs={"streamer": it})
        worker.start()
        streamed = "".join(it)
        worker.join()
    assert streamer.text.strip() == returned == streamed.strip()
    assert len(returned.split()) == int((out[0, L:] >= 4).sum()) > 6  # every word but special ids


def test_return_dict_in_generate_scores_cache_and_stats(model):
    ids = prompt()
    with evicting(model, "pyramidkv", budget=BUDGET, window=8) as ev:
        plain = gen(model, ids)
        out = gen(model, ids, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == len(out.logits) == 12
    assert torch.equal(torch.stack(out.scores).argmax(-1)[:, 0], out.sequences[0, L:])
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    assert isinstance(cache, EvictableCache) and cache.get_seq_length() == L + 11
    kept = ev.last.kept_per_layer
    assert sum(kept) == 3 * BUDGET and kept[0] > kept[-1]  # PyramidKV: per-layer budgets, same total
    assert [layer.keys.shape[-2] for layer in cache.layers] == [k + 11 for k in kept]
    assert ev.last.kv_bytes_kept / ev.last.kv_bytes_full == pytest.approx(BUDGET / L)
    assert ev.last.kept_tokens == BUDGET and ev.last.seconds > 0 and len(ev.evictions) == 2


def test_the_prompt_cache_is_freed_after_eviction(model):
    ids = prompt()
    refs = []

    def grab(module, args, kwargs, output):  # runs before evicting's own hook: sees the un-evicted tensors
        cache = kwargs.get(_cache_kw(model))
        if isinstance(cache, EvictableCache) and not refs:
            refs.extend(weakref.ref(layer.keys) for layer in cache.layers)
            assert cache.layers[0].keys.shape[-2] == L

    handle = model.register_forward_hook(grab, with_kwargs=True)
    try:
        with evicting(model, "snapkv", budget=BUDGET, window=8):
            out = gen(model, ids, return_dict_in_generate=True)
    finally:
        handle.remove()
    gc.collect()
    assert len(refs) == 3 and all(r() is None for r in refs)
    assert out.sequences.shape[1] == L + 12


# PyramidKV's layer budgets are capped by the (padded) prompt length: batch and single runs agree where every
# prompt is longer than its largest layer budget (here 28), as in this test.
@pytest.mark.parametrize("name,budget", [("snapkv", 30), ("pyramidkv", 16), ("h2o", 30), ("lookahead", 30)])
def test_a_left_padded_batch_equals_single_runs(model, name, budget):
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(4, 128, (n,), generator=g) for n in (60, 41, 52)]
    ids, mask = left_pad(prompts)
    with evicting(model, name, budget=budget, **(dict(window=4) if name == "pyramidkv" else options(name))) as ev:
        batch = gen(model, ids, 8, mask=mask)[:, ids.shape[1]:].tolist()
        singles = [gen(model, p[None], 8)[0, len(p):].tolist() for p in prompts]
    assert batch == singles
    assert ev.evictions[0].kept_per_layer == ev.evictions[1].kept_per_layer


def test_pipeline_and_chat_messages(model):
    tok = tiny_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = " ".join(f"w{t}" for t in prompt()[0].tolist())
    messages = [{"role": "user", "content": text}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    chat_ids = chat_ids["input_ids"]
    with evicting(model, "snapkv", budget=BUDGET, window=8) as ev:
        out = pipe(text, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
        chat = pipe(messages, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]["content"]
    ours, _, _ = generate_ids(model, prompt(), None, "snapkv", BUDGET, Sampling(10), set(), window=8)
    ours_chat, _, _ = generate_ids(model, chat_ids, None, "snapkv", BUDGET, Sampling(10), set(), window=8)
    assert out.strip() == tok.decode(ours[0], skip_special_tokens=True)
    assert chat.strip() == tok.decode(ours_chat[0], skip_special_tokens=True)
    assert [e.prompt_tokens for e in ev.evictions] == [L, chat_ids.shape[1]]


def test_errors_leave_the_model_as_it_was(model):
    ids = prompt()
    plain = gen(model, ids)
    with pytest.raises(LookaheadKVError, match="below what snapkv always keeps"):
        with evicting(model, "snapkv", budget=8):
            gen(model, ids)
    with pytest.raises(LookaheadKVError, match="nothing was evicted yet"):
        with evicting(model, "snapkv", budget=40) as ev:
            _ = ev.last
    with pytest.raises(LookaheadKVError, match="already inside an evicting"):
        with evicting(model, "snapkv", budget=40), evicting(model, "h2o", budget=40):
            pass
    assert torch.equal(gen(model, ids), plain)  # no hook is left behind
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_beam_search_and_several_sequences_per_prompt(model):
    ids = prompt()
    for kw in (dict(num_beams=3), dict(num_beams=2, num_return_sequences=2),
               dict(do_sample=True, num_return_sequences=3)):
        torch.manual_seed(2)
        plain = gen(model, ids, 8, **kw)
        with evicting(model, "snapkv", budget=L):
            torch.manual_seed(2)
            assert torch.equal(gen(model, ids, 8, **kw), plain)
    with evicting(model, "snapkv", budget=BUDGET, window=8) as ev:
        out = gen(model, ids, 8, num_beams=3, num_return_sequences=3, return_dict_in_generate=True)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    assert ev.last.kept_per_layer == [BUDGET] * 3 and ev.last.prompt_tokens == L
    assert [layer.keys.shape[:3] for layer in cache.layers] == [(3, 2, BUDGET + 7)] * 3
    assert cache.layers[0].positions.shape == (3, 2, BUDGET + 7)


def test_chunked_prefill_is_refused(model):
    ids = prompt()
    with evicting(model, "snapkv", budget=BUDGET, window=8):
        with pytest.raises(LookaheadKVError, match="evicts once, after the whole prompt's prefill"):
            gen(model, ids, 4, prefill_chunk_size=16)


def test_the_attention_implementation_is_restored():
    m = tiny_model()
    m.set_attn_implementation("sdpa")
    ids = prompt()
    plain = gen(m, ids)
    with evicting(m, "snapkv", budget=L):
        assert m.config._attn_implementation == "lookaheadkv"
        assert torch.equal(gen(m, ids), plain)
    assert m.config._attn_implementation == "sdpa"
