"""The core pipeline's properties (design.md), on tiny random-weight models."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import left_pad, tiny_model

from lookaheadkv import METHODS, LookaheadKVError, generate_ids, get_method
from lookaheadkv.cache import kv_bytes
from lookaheadkv.decode import Sampling
from lookaheadkv.generate import evict, resolve_budget
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


def test_every_registered_core_method_is_tested():
    assert set(CORE) <= set(METHODS)


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


def snapkv_reference(model, ids, budget, window, kernel):
    """SnapKV's selection computed directly from eager attention weights (tiny prompts only)."""
    eager = tiny_model()  # same seed -> same weights, eager attention returns the full matrices
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    out = eager(ids, output_attentions=True)
    kept = []
    length = ids.shape[1]
    for attn in out.attentions:  # [B, Hq, L, L]
        s = attn[:, :, -window:, :].mean(dim=2)
        s = F.max_pool1d(s, kernel, stride=1, padding=kernel // 2)
        s = s.view(s.shape[0], 2, 2, length).mean(dim=2)  # 4 query heads onto 2 KV heads
        s[..., -window:] = float("inf")
        top = s.sort(dim=-1, descending=True, stable=True).indices[..., :budget]  # ties: earlier position first
        kept.append(top.sort(dim=-1).values)
    return kept


def test_kept_indices_are_the_top_budget_of_a_direct_reference(tiny):
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(4))
    pf = prefill(tiny, ids, record_rows=8)
    ev = evict(tiny, pf, get_method("snapkv", window=8, kernel=5), 24)
    for ours, ref in zip(ev.kept, snapkv_reference(tiny, ids, 24, 8, 5)):
        assert torch.equal(ours, ref)


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


def test_sampling_is_seeded_and_top_p_restricts(tiny):
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(7))
    a, _, _ = generate_ids(tiny, ids, None, "snapkv", 32, Sampling(10, temperature=1.0, seed=3), eos_ids=set())
    b, _, _ = generate_ids(tiny, ids, None, "snapkv", 32, Sampling(10, temperature=1.0, seed=3), eos_ids=set())
    c, _, _ = generate_ids(tiny, ids, None, "snapkv", 32, Sampling(10, temperature=1.0, top_p=1e-9, seed=3),
                           eos_ids=set())
    g, _, _ = generate_ids(tiny, ids, None, "snapkv", 32, Sampling(10), eos_ids=set())
    assert a == b
    assert c == g  # top_p -> 0 keeps only the most likely token: greedy


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


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "laq"])
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


def test_no_prompt_by_prompt_attention_is_materialised(tiny, monkeypatch):
    """H2O scores every prompt row, but in chunks: no call ever sees more than ROW_CHUNK query rows."""
    from lookaheadkv import attention

    seen = []
    original = attention.row_attention

    def spy(query, key, *args):
        seen.append((query.shape[2], key.shape[2]))
        return original(query, key, *args)

    monkeypatch.setattr(attention, "row_attention", spy)
    monkeypatch.setattr(attention, "ROW_CHUNK", 16)
    ids = torch.randint(3, 128, (1, 70))
    chunked = prefill(tiny, ids, record_rows=-1).recordings[-1].mean()
    assert max(rows for rows, _ in seen) == 16 and sum(rows for rows, _ in seen) == 70 * 3
    monkeypatch.setattr(attention, "ROW_CHUNK", 1024)
    whole = prefill(tiny, ids, record_rows=-1).recordings[-1].mean()
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b)
