"""The core pipeline's properties (design.md), on tiny random-weight models."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import left_pad, tiny_model

from lookaheadkv import METHODS, LookaheadKVError, generate_ids, get_method
from lookaheadkv.cache import kv_bytes
from lookaheadkv.decode import Sampling, next_token
from lookaheadkv.generate import evict, resolve_budget
from lookaheadkv.importance import true_importance
from lookaheadkv.prefill import prefill
from lookaheadkv.scoring import layer_budgets

CORE = ["full", "streamingllm", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "random"]


def reference_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", CORE)
def test_budget_equal_to_prompt_reproduces_full_cache(tiny, name):
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(1))
    ref = reference_greedy(tiny, ids, 12)
    tokens, ev, _ = generate_ids(tiny, ids, None, name, budget=70, sampling=Sampling(12), eos_ids=set())
    assert tokens[0] == ref
    assert ev.kept_per_layer == [70, 70, 70]


def test_every_registered_method_is_tested():
    """Each method has a test of its kept positions at a budget below the prompt: here against REFERENCE (or, for
    random, its distribution), and the drafting and lookahead methods in test_drafts.py / test_lookahead.py."""
    assert set(METHODS) == set(REFERENCE) | {"random", "laq", "speckv", "lookahead"}
    assert set(CORE) == set(REFERENCE) | {"random"}


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "streamingllm", "knorm", "random", "tova"])
def test_cache_holds_exactly_budget_entries_per_kv_head(tiny, name):
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(2))
    pf = prefill(tiny, ids, record_rows=get_method(name).prefill_rows())
    full = kv_bytes(pf.cache)
    ev = evict(tiny, pf, get_method(name), 40)
    lengths = [layer.keys.shape[-2] for layer in pf.cache.layers]
    for layer in pf.cache.layers:  # per KV head, no repeat_kv copies
        assert layer.keys.shape[:2] == (2, 2) and layer.values.shape == layer.keys.shape
    assert sum(lengths) == 3 * 40
    if name != "pyramidkv":
        assert lengths == [40, 40, 40]
    else:
        assert lengths[0] > lengths[-1]
    assert ev.kv_bytes_full == full and ev.kv_bytes_kept == kv_bytes(pf.cache)
    assert ev.kv_bytes_kept / ev.kv_bytes_full == pytest.approx(40 / 90)


def test_compaction_releases_the_old_tensors(tiny):
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    pf = prefill(tiny, ids, record_rows=32)
    old = [weakref.ref(layer.keys) for layer in pf.cache.layers]
    evict(tiny, pf, get_method("snapkv"), 40)
    gc.collect()
    assert all(r() is None for r in old)


def eager_run(model, ids):
    """Eager attention weights [B, Hq, L, L] per layer and HF's own cache keys: computed apart from our prefill."""
    eager = tiny_model()  # same seed -> same weights, eager attention returns the full matrices
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    out = eager(ids, output_attentions=True, use_cache=True)
    return out.attentions, [layer.keys for layer in out.past_key_values.layers]


def _top(scores, k, forced):
    """The k positions with the highest scores, `forced` ones first; ties by position; ascending."""
    s = scores.clone()
    s[..., forced] = float("inf")
    return s.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values


def _kv(s):
    return s.view(1, 2, 2, s.shape[-1]).mean(dim=2)  # the tiny model's 4 query heads onto its 2 KV heads


def _snap(a, k):  # SnapKV's score: the last 8 rows' mean attention, max-pooled (kernel 7), GQA mean
    return _top(_kv(F.max_pool1d(a[:, :, -8:].mean(dim=2), 7, stride=1, padding=3)), k, list(range(52, 60)))


# What each method keeps of a 60-token prompt, per layer [1, Hkv, k], from eager attention `a` and keys `key`,
# as the README's table describes the method (window 8 where there is one).
REFERENCE = {
    "full": lambda a, key, k: torch.arange(60).expand(1, 2, 60),
    "streamingllm": lambda a, key, k: torch.tensor(list(range(4)) + list(range(60 - k + 4, 60))).expand(1, 2, k),
    "snapkv": lambda a, key, k: _snap(a, k),
    "pyramidkv": lambda a, key, k: _snap(a, k),  # SnapKV's scores, at the layer's own budget
    "h2o": lambda a, key, k: _top(_kv(a.mean(dim=2)), k, list(range(52, 60))),  # every row's attention
    "tova": lambda a, key, k: _top(_kv(a[:, :, -1]), k, [59]),  # the last row's, which it keeps
    "knorm": lambda a, key, k: _top(-key.norm(dim=-1), k, []),  # the smallest key norms
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_kept_positions_below_the_prompt_equal_a_direct_reference(tiny, name):
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(4))
    options = {"window": 8} if name in ("snapkv", "pyramidkv", "h2o") else {}
    _, ev, _ = generate_ids(tiny, ids, None, name, 24, Sampling(1), set(), **options)
    budgets = ev.kept_per_layer if name == "pyramidkv" else [60 if name == "full" else 24] * 3
    if name == "pyramidkv":  # its per-layer budgets (tested on their own below) really differ
        assert sum(budgets) == 3 * 24 and budgets[0] > budgets[-1]
    for got, a, key, k in zip(ev.kept, *eager_run(tiny, ids), budgets):
        want = REFERENCE[name](a, key, k)
        assert torch.equal(torch.arange(60).expand(1, 2, 60) if got is None else got, want)


def test_random_keeps_uniformly_spread_positions_fixed_by_its_seed(tiny):
    pf = prefill(tiny, torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(4)))
    counts = torch.zeros(60)
    for seed in range(100):
        for k in evict(tiny, pf.clone(), get_method("random", seed=seed), 30).kept:
            counts += torch.bincount(k.flatten(), minlength=60)
    share = counts / (100 * 3 * 2)  # 600 draws a position; each keeps 30 of 60
    assert float((share - 0.5).abs().max()) < 0.1  # 5 standard deviations
    a, b, c = (evict(tiny, pf.clone(), get_method("random", seed=s), 30).kept for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))


def test_decoding_after_eviction_uses_original_positions():
    """One layer, one KV head: eviction = hiding the evicted keys from the new rows at their true positions."""
    model = tiny_model(layers=1, kv_heads=1, heads=2)
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    tokens, ev, _ = generate_ids(model, ids, None, "snapkv", budget=20, sampling=Sampling(6), eos_ids=set(),
                                 window=4)
    mask = torch.zeros(1, 50, dtype=torch.long)
    mask[0, ev.kept[0][0, 0]] = 1
    ref = [int(model(ids).logits[0, -1].argmax())]  # the first token comes from the full prefill
    seq = torch.cat([ids, torch.tensor([ref])], dim=1)
    for _ in range(5):
        m = torch.cat([mask, torch.ones(1, seq.shape[1] - 50, dtype=torch.long)], dim=1)
        logits = model(seq, attention_mask=m, position_ids=torch.arange(seq.shape[1])[None]).logits
        ref.append(int(logits[0, -1].argmax()))
        seq = torch.cat([seq, torch.tensor([[ref[-1]]])], dim=1)
    assert tokens[0] == ref
    # and renumbering the positions (what a naive cache would do) changes the answer's logits
    kept_ids = ids[:, ev.kept[0][0, 0]]
    renum = model(torch.cat([kept_ids, torch.tensor([[ref[0]]])], dim=1)).logits[0, -1]
    true_pos = model(seq[:, :51], attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1),
                     position_ids=torch.arange(51)[None]).logits[0, -1]
    assert not torch.allclose(renum, true_pos)


@pytest.mark.parametrize("name,budget,options", [
    ("snapkv", 30, {}), ("snapkv", 30, {"pooling": "avg"}), ("snapkv", 30, {"pooling": "avg", "kernel": 6}),
    ("pyramidkv", 20, {}), ("h2o", 45, {}), ("h2o", 45, {"pooling": "avg", "kernel": 5}), ("knorm", 45, {})])
def test_left_padded_batch_equals_single_runs_and_keeps_no_pad(tiny, name, budget, options):
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (60, 41, 52)]
    ids, mask = left_pad(prompts)
    length = ids.shape[1]
    batch, ev, _ = generate_ids(tiny, ids, mask, name, budget, Sampling(8), eos_ids=set(), window=8, **options)
    for i, p in enumerate(prompts):
        single, ev1, _ = generate_ids(tiny, p[None], None, name, budget, Sampling(8), eos_ids=set(), window=8,
                                      **options)
        assert batch[i] == single[0]
        pad = length - len(p)
        for idx, alone in zip(ev.kept, ev1.kept):
            real_kept = (idx[i] >= pad).sum(dim=-1)
            assert torch.all(real_kept == min(len(p), idx.shape[-1]))  # pads only where a prompt is short
            if alone is not None:  # the very positions the prompt keeps alone
                assert torch.equal(idx[i] - pad, alone[0])


def test_pyramid_budgets_average_to_the_budget_and_respect_bounds():
    for budget, layers, length, floor in [(128, 30, 3000, 32), (64, 24, 100, 32), (40, 3, 45, 32), (100, 7, 90, 8)]:
        b = layer_budgets(budget, layers, length, "pyramid", floor)
        assert sum(b) == layers * min(budget, length)
        assert all(floor <= x <= length for x in b)
        assert b == sorted(b, reverse=True)


def test_sampling_depends_on_the_seed_and_tends_to_greedy_as_the_temperature_falls(tiny):
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(7))

    def run(**kw):
        return generate_ids(tiny, ids, None, "snapkv", 32, Sampling(10, **kw), eos_ids=set())[0][0]

    greedy = run()
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    assert run(temperature=1.0, seed=3) != greedy
    assert run(temperature=1e-4, seed=3) == greedy


def test_top_p_samples_only_from_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)

    def draws(top_p):
        return [int(next_token(logits, Sampling(temperature=1.0, top_p=top_p), gen)) for _ in range(400)]

    nucleus = draws(0.6)  # 0.5 alone falls short of 0.6; 0.5 + 0.3 reaches it
    assert set(nucleus) == {0, 1} and abs(nucleus.count(0) / 400 - 0.5 / 0.8) < 0.1  # renormalised inside it
    assert set(draws(1.0)) == {0, 1, 2, 3}


def test_eos_stops_a_sequence(tiny):
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(8))
    full, _, _ = generate_ids(tiny, ids, None, "full", sampling=Sampling(10), eos_ids=set())
    cut, _, _ = generate_ids(tiny, ids, None, "full", sampling=Sampling(10), eos_ids={full[0][3]})
    assert cut[0] == full[0][: full[0].index(full[0][3])]


def test_bad_method_options_are_clear_errors(tiny):
    ids = torch.randint(3, 128, (1, 60))
    with pytest.raises(LookaheadKVError, match="unknown method 'snap'"):
        get_method("snap")
    with pytest.raises(LookaheadKVError, match="has no option colour"):
        get_method("snapkv", colour=1)
    with pytest.raises(LookaheadKVError, match="below what snapkv always keeps"):
        generate_ids(tiny, ids, None, "snapkv", budget=16)
    with pytest.raises(LookaheadKVError, match="budget must be a positive"):
        generate_ids(tiny, ids, None, "snapkv", budget=0)


def test_budget_below_window_plus_sinks_is_refused_and_at_it_every_forced_entry_is_kept(tiny):
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(11))
    with pytest.raises(LookaheadKVError, match=r"below what snapkv always keeps \(20: window 16 \+ sinks 4\)"):
        generate_ids(tiny, ids, None, "snapkv", budget=16, sinks=4, window=16)
    _, ev, _ = generate_ids(tiny, ids, None, "snapkv", budget=20, sampling=Sampling(1), eos_ids=set(), sinks=4,
                            window=16)
    forced = list(range(4)) + list(range(44, 60))  # the first 4 and the last 16 (the question) positions
    assert all(k[0, h].tolist() == forced for k in ev.kept for h in range(2))
    short = ids[:, :15]  # a budget that covers the prompt evicts nothing, however much is forced
    _, ev, _ = generate_ids(tiny, short, None, "snapkv", budget=15, sampling=Sampling(1), eos_ids=set(), sinks=4,
                            window=16)
    assert ev.kept_per_layer == [15, 15, 15]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])  # LAQ's window may be 0 (its draft rows remain)
def test_a_window_of_0_is_refused_where_the_window_is_the_glimpse(tiny, name):
    ids = torch.randint(3, 128, (1, 60))
    with pytest.raises(LookaheadKVError, match="window must be >= 1, got 0"):
        generate_ids(tiny, ids, None, name, budget=30, sampling=Sampling(1), eos_ids=set(), window=0)
    _, ev, _ = generate_ids(tiny, ids, None, "h2o", budget=30, sampling=Sampling(1), eos_ids=set(), window=0)
    assert ev.kept_per_layer == [30, 30, 30]  # where the window is only what is kept, 0 is fine


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 1.0, 128.0, 0, -3, 1.5, True, "64"])
def test_a_budget_is_whole_tokens_or_a_ratio_below_1_and_nothing_else(budget):
    with pytest.raises(LookaheadKVError, match="budget must be a positive whole number of tokens"):
        resolve_budget(budget, 100)


def test_budget_ratio(tiny):
    ids = torch.randint(3, 128, (1, 100))
    _, ev, _ = generate_ids(tiny, ids, None, "snapkv", budget=0.5, sampling=Sampling(2), eos_ids=set())
    assert ev.kept_per_layer == [50, 50, 50]
    assert (resolve_budget(0.999, 100), resolve_budget(7, 100), resolve_budget(0.001, 100)) == (99, 7, 1)


def test_true_importance_is_the_answer_rows_mean_attention_computed_directly(tiny):
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (30, 22)]
    responses = torch.randint(3, 128, (2, 5), generator=g)
    ids, mask = left_pad(prompts)
    truth = true_importance(tiny, prefill(tiny, ids, mask), responses)  # a left-padded batch
    for i, p in enumerate(prompts):
        att, _ = eager_run(tiny, torch.cat([p, responses[i]])[None])  # the sequence alone, every row
        pad = ids.shape[1] - len(p)
        for t, a in zip(truth, att):
            want = a[0, :, len(p):, :len(p)].mean(dim=1)  # the 5 answer rows onto the prompt, per query head
            torch.testing.assert_close(t[i, :, pad:].double(), want, rtol=0, atol=1e-6)
            assert torch.all(t[i, :, :pad] == 0)  # no attention on pads


def test_no_prompt_by_prompt_attention_is_materialised(tiny, monkeypatch):
    """H2O scores every prompt row, but in chunks: no call ever sees more than ROW_CHUNK query rows."""
    from lookaheadkv import attention

    seen = []

    def spy(original):
        def call(query, key, *args):
            seen.append((query.shape[2], key.shape[2]))
            return original(query, key, *args)
        return call

    ids = torch.randint(3, 128, (1, 70))
    prefill(tiny, ids, record_rows=8)  # the one-time check of the attention call's log-sum-exp, done first
    for name in ("row_attention", "row_sums"):  # row_sums: given the attention call's log-sum-exp
        monkeypatch.setattr(attention, name, spy(getattr(attention, name)))
    monkeypatch.setattr(attention, "ROW_CHUNK", 16)
    chunked = prefill(tiny, ids, record_rows=-1).recordings[-1].mean()
    assert max(rows for rows, _ in seen) == 16 and sum(rows for rows, _ in seen) == 70 * 3
    monkeypatch.setattr(attention, "ROW_CHUNK", 1024)
    whole = prefill(tiny, ids, record_rows=-1).recordings[-1].mean()
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b)


def test_a_prompt_prefill_may_use_every_sdpa_backend_and_later_calls_leave_cudnn_out(tiny, monkeypatch):
    from torch.nn.attention import SDPBackend

    from lookaheadkv import prefill as pre

    assert pre.sdpa_backends(torch.device("cuda"), prompt=True) is None
    assert SDPBackend.CUDNN_ATTENTION not in pre.sdpa_backends(torch.device("cuda"), prompt=False)
    assert pre.sdpa_backends(torch.device("cpu"), prompt=False) is None
    asked = []
    real = pre.sdpa_backends
    monkeypatch.setattr(pre, "sdpa_backends", lambda device, prompt: asked.append(prompt) or real(device, prompt))
    generate_ids(tiny, torch.randint(3, 128, (1, 60)), None, "snapkv", 40, Sampling(3), set())
    assert asked[0] is True and asked[1:] and not any(asked[1:])  # the prefill, then decode steps
