"""LAQ and SpecKV (lookaheadkv.drafts) on tiny random-weight models, against direct references."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import left_pad, save_tiny, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lookaheadkv import LookaheadKVError, drafts, generate_ids, get_method
from lookaheadkv.cache import kv_bytes, kv_lengths
from lookaheadkv.decode import Sampling, decode
from lookaheadkv.generate import evict
from lookaheadkv.prefill import prefill


def no_eos(model):
    """No EOS (drafts run their full length), and the one tokenizer identity of the tiny models' ids."""
    model.generation_config.eos_token_id = None
    model.tokenizer_sha256 = "tiny: ids 0-127"
    return model


@pytest.fixture(scope="module")
def target():
    return no_eos(tiny_model())


@pytest.fixture(scope="module")
def drafter():
    """A different tiny model with the same vocabulary: its greedy answer is not the target's."""
    return no_eos(tiny_model(layers=2, seed=7))


def prompt(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def method(name, drafter=None, **kw):
    if name == "speckv":
        kw.setdefault("draft_model", drafter)
    if name == "laq":
        kw.setdefault("draft_window", 8)  # the tests' prompts are short; its draft follows the eviction budget
    return get_method(name, **kw)


def draft_part(name):
    return "draft_score" if name == "laq" else "draft_rows"  # LAQ scores captured queries; SpecKV runs a pass


def drafted_reference(model, ids, draft, window, budget, kernel, kv_heads=2):
    """Kept positions from eager attention over [prompt; draft]: mean of the last `window` prompt rows and the
    draft rows onto the prompt keys, max-pooled, GQA mean, window forced, stable top-k."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    seq = torch.cat([ids, torch.tensor([draft], dtype=torch.long)], dim=1)
    length = ids.shape[1]
    kept = []
    for att in eager(seq, output_attentions=True).attentions:
        rows = torch.cat([att[:, :, length - window:length, :length], att[:, :, length:, :length]], dim=2)
        s = F.max_pool1d(rows.mean(dim=2), kernel, stride=1, padding=kernel // 2)
        s = s.view(1, kv_heads, -1, length).mean(dim=2)
        s[..., -window:] = float("inf")
        kept.append(s.sort(dim=-1, descending=True, stable=True).indices[..., :budget].sort(dim=-1).values)
    return kept


@pytest.mark.parametrize("name", ["laq", "speckv"])
def test_budget_equal_to_prompt_reproduces_full_cache(target, drafter, name):
    ids = prompt(70, 1)
    ref = hf_greedy(target, ids, 12)
    m = method(name, drafter, window=8)
    tokens, ev, _ = generate_ids(target, ids, None, m, budget=70, sampling=Sampling(12), eos_ids=set())
    assert tokens[0] == ref
    assert ev.kept_per_layer == [70, 70, 70]
    assert ev.parts[draft_part(name)] > 0  # the draft really ran (budget == prompt still scores)


@pytest.mark.parametrize("name", ["laq", "speckv"])
def test_draft_tokens_never_stay_in_the_cache(target, drafter, name):
    ids = prompt(70, 2, batch=2)
    pf = prefill(target, ids, record_rows=8)
    keys = [layer.keys.clone() for layer in pf.cache.layers]
    full = kv_bytes(pf.cache)
    m = method(name, drafter, window=8, **({"draft_budget": 30} if name == "laq" else {}))
    m.scores(target, pf)  # glimpse alone: the draft ran over the cache and was dropped, the prompt KV is as it was
    assert kv_lengths(pf.cache) == [70, 70, 70]
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, pf.cache.layers))
    ev = evict(target, pf, m, 30)
    assert kv_lengths(pf.cache) == [30, 30, 30]
    assert ev.kv_bytes_full == full and ev.kv_bytes_kept == kv_bytes(pf.cache) == full * 30 // 70


@pytest.mark.parametrize("name", ["laq", "speckv"])
def test_decoding_after_eviction_uses_original_positions(name):
    """One layer, one KV head: eviction = hiding the evicted keys from new rows at their true positions."""
    model = no_eos(tiny_model(layers=1, kv_heads=1, heads=2))
    dm = no_eos(tiny_model(layers=1, kv_heads=1, heads=2, seed=9))
    ids = prompt(50, 5)
    m = method(name, dm, window=4, draft_window=4) if name == "laq" else method(name, dm, window=4)
    tokens, ev, _ = generate_ids(model, ids, None, m, budget=20, sampling=Sampling(6), eos_ids=set())
    mask = torch.zeros(1, 50, dtype=torch.long)
    mask[0, ev.kept[0][0, 0]] = 1
    ref = [int(model(ids).logits[0, -1].argmax())]  # the first token comes from the full prefill, not the draft
    seq = torch.cat([ids, torch.tensor([ref])], dim=1)
    for _ in range(5):
        m_ = torch.cat([mask, torch.ones(1, seq.shape[1] - 50, dtype=torch.long)], dim=1)
        logits = model(seq, attention_mask=m_, position_ids=torch.arange(seq.shape[1])[None]).logits
        ref.append(int(logits[0, -1].argmax()))
        seq = torch.cat([seq, torch.tensor([[ref[-1]]])], dim=1)
    assert tokens[0] == ref


@pytest.mark.parametrize("window", [8, 32])
def test_laq_without_draft_tokens_is_snapkv(target, window):
    ids = prompt(90, 3, batch=2)
    pf = prefill(target, ids, record_rows=window)
    snap = evict(target, pf.clone(), get_method("snapkv", window=window), 40)
    laq = evict(target, pf.clone(), get_method("laq", window=window, k=0), 40)
    assert all(torch.equal(a, b) for a, b in zip(snap.kept, laq.kept))
    with_draft = evict(target, pf.clone(), get_method("laq", window=window, k=8, draft_window=window), 40)
    assert not all(torch.equal(a, b) for a, b in zip(snap.kept, with_draft.kept))  # the draft rows do count


def laq_reference(model, ids, budget, window, k, draft_window, kernel=7, kv_heads=2):
    """LAQ as its authors' code defines it, computed directly in float64 on one unpadded prompt: SnapKV's kept
    set at the eviction budget (eager attention of the last draft_window rows); greedy drafting as one
    teacher-forced pass over [prompt; draft] in which the draft rows see only the kept prompt entries of each
    layer and KV head (= decoding on the compressed copy), its queries kept; then [last `window` prompt rows +
    those queries] over the full prompt's keys (softmax over the prompt), max-pooled, GQA mean, window forced,
    stable top-k. Returns (draft tokens, per layer mean rows [1, Hq, L], kept)."""
    length = ids.shape[1]
    snap = drafted_reference(model, ids, [], draft_window, budget, kernel, kv_heads)
    seen = {}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        b, hq, t, _ = query.shape
        g = hq // key.shape[1]
        logits = query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling
        mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, hq, t, t).clone()
        allowed = torch.ones(b, key.shape[1], t, dtype=torch.bool)
        allowed[..., :length] = False
        allowed[..., :length].scatter_(2, snap[module.layer_idx], True)
        mask[:, :, length:] &= allowed.repeat_interleave(g, 1)[:, :, None, :]
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        seen[module.layer_idx] = (query, key, probs)
        return (probs @ value.repeat_interleave(g, 1)).transpose(1, 2), None

    AttentionInterface.register("laq_reference", attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register("laq_reference", sdpa_mask)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("laq_reference")
    draft = [int(model(ids).logits[0, -1].argmax())]  # the full prefill's first token
    while True:
        logits = ref(torch.cat([ids, torch.tensor([draft])], dim=1)).logits
        if len(draft) == k:
            break
        draft.append(int(logits[0, -1].argmax()))
    rows, kept = [], []
    for li in range(len(seen)):
        query, key, probs = seen[li]
        g = query.shape[1] // key.shape[1]
        scaling = model.model.layers[li].self_attn.scaling
        drafted = (query[:, :, length:] @ key[:, :, :length].repeat_interleave(g, 1).transpose(-1, -2) * scaling)
        both = torch.cat([probs[:, :, length - window:length, :length], drafted.softmax(-1)], dim=2)
        rows.append(both.mean(dim=2))
        s = F.max_pool1d(rows[-1], kernel, stride=1, padding=kernel // 2).view(1, kv_heads, -1, length).mean(dim=2)
        s[..., length - window:] = float("inf")
        kept.append(s.sort(dim=-1, descending=True, stable=True).indices[..., :budget].sort(dim=-1).values)
    return draft, rows, kept


def test_laq_is_its_papers_draft_decoded_on_a_cache_compressed_to_the_budget(target, monkeypatch):
    ids = prompt(70, 4)
    m = method("laq", window=4, k=5, draft_window=8)
    draft, rows, kept = laq_reference(target, ids, 24, 4, 5, 8)
    assert draft != hf_greedy(target, ids, 5)  # the compressed copy's answer, not the full cache's
    assert len(draft) == m.k
    budgets = []
    real = drafts.evict
    monkeypatch.setattr(drafts, "evict", lambda model, pf, meth, b: budgets.append(b) or real(model, pf, meth, b))
    pf = prefill(target, ids, record_rows=m.recorded())
    assert m.recorded() == [4, 8]
    ev = evict(target, pf, m, 24)
    assert budgets == [24]  # the SnapKV copy at the eviction budget itself
    for ours, ref in zip(ev.kept, kept):
        assert torch.equal(ours, ref)
    fixed = method("laq", window=4, k=5, draft_window=8, draft_budget=24)  # the same, its budget given
    pf = prefill(target, ids, record_rows=fixed.recorded())
    assert fixed.draft(target, pf)[0].tolist() == draft
    for ours, ref in zip(fixed.glimpse(target, pf), rows):  # the scores themselves, against the direct formula
        assert torch.allclose(ours, ref, atol=1e-12)
    parts = evict(target, pf, fixed, 24).parts
    assert {"draft_compress", "draft_decode", "draft_score"} <= set(parts) and "draft_rows" not in parts


def test_laq_alone_has_no_window_and_its_draft_window_is_checked(target):
    ids = prompt(70, 5)
    pure = method("laq", window=0, k=4)  # LAQ without its "++" window: the pseudo queries alone
    assert pure.recorded() == [8] and pure.floor() == 1
    _, ev, _ = generate_ids(target, ids, None, pure, 24, Sampling(1), eos_ids=set())
    _, ev8, _ = generate_ids(target, ids, None, method("laq", window=8, k=4), 24, Sampling(1), eos_ids=set())
    assert ev.kept_per_layer == [24, 24, 24]
    assert not all(bool((k[..., -8:] == torch.arange(62, 70)).all()) for k in ev.kept)  # no forced recent window
    assert all(bool((k[..., -8:] == torch.arange(62, 70)).all()) for k in ev8.kept)
    with pytest.raises(LookaheadKVError, match="draft_window must be >= 1, got 0"):
        get_method("laq", draft_window=0)
    with pytest.raises(LookaheadKVError, match="below the 32 SnapKV keeps"):
        generate_ids(target, ids, None, get_method("laq"), 24, Sampling(1))  # default draft_window 32 > budget 24
    with pytest.raises(LookaheadKVError, match="eviction budget, unknown here"):
        get_method("laq", draft_window=8).scores(target, prefill(target, ids, record_rows=8))
    assert not get_method("laq").budget_free() and get_method("laq", draft_budget=64).budget_free()


def test_speckv_drafts_with_the_draft_model(target, drafter):
    ids = prompt(70, 4)
    m = method("speckv", drafter, window=8, k=10)
    draft = m.draft(target, prefill(target, ids, record_rows=8))[0].tolist()
    assert draft == hf_greedy(drafter, ids, 10)
    assert draft != hf_greedy(target, ids, 10)
    _, ev, _ = generate_ids(target, ids, None, m, 24, Sampling(1), eos_ids=set())
    for ours, ref in zip(ev.kept, drafted_reference(target, ids, draft, 8, 24, 7)):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["speckv"])  # LAQ's rows are its draft's own queries (tested above)
def test_a_stubbed_draft_moves_the_kept_set_as_predicted(target, drafter, name):
    ids = prompt(70, 6)
    kept = {}
    for stub in ([5, 6, 7, 8], ids[0, 10:16].tolist()):  # any tokens vs. a copy of the prompt's positions 10-15
        m = method(name, drafter, window=8)
        m.draft = lambda model, pf, stub=stub: torch.tensor([stub])
        _, ev, _ = generate_ids(target, ids, None, m, 24, Sampling(1), eos_ids=set())
        for ours, ref in zip(ev.kept, drafted_reference(target, ids, stub, 8, 24, 7)):
            assert torch.equal(ours, ref)
        kept[tuple(stub)] = ev.kept
    a, b = kept.values()
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_single_sequence_draft_stops_at_eos(target, drafter):
    ids = prompt(70, 4)
    full = hf_greedy(drafter, ids, 10)
    dm = copy.deepcopy(drafter)
    dm.generation_config.eos_token_id = full[3]
    draft = method("speckv", dm, window=8, k=10).draft(target, prefill(target, ids, record_rows=8))
    assert draft[0].tolist() == full[: full.index(full[3])]


@pytest.mark.parametrize("name,sdpa_draft", [("laq", False), ("speckv", False), ("speckv", True)])
def test_left_padded_batch_equals_single_runs(target, drafter, name, sdpa_draft):
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (60, 41, 52)]
    ids, mask = left_pad(prompts)
    length = ids.shape[1]
    dm = drafter
    if sdpa_draft:  # a draft model left on its own attention implementation still drafts each prompt right
        dm = copy.deepcopy(drafter)
        dm.set_attn_implementation("sdpa")
    m = method(name, dm, window=8)
    batch, ev, _ = generate_ids(target, ids, mask, m, 30, Sampling(6), eos_ids=set())
    for i, p in enumerate(prompts):
        single, ev1, _ = generate_ids(target, p[None], None, m, 30, Sampling(6), eos_ids=set())
        assert batch[i] == single[0]
        pad = length - len(p)
        for a, b in zip(ev.kept, ev1.kept):
            assert torch.equal(a[i] - pad, b[0])


def test_eviction_time_is_split_into_parts(target, drafter):
    ids = prompt(70, 2)
    for name, own in [("laq", {"draft_compress", "draft_decode", "draft_score"}),
                      ("speckv", {"draft_prefill", "draft_decode", "draft_rows"})]:
        m = method(name, drafter, window=8)
        _, ev, timings = generate_ids(target, ids, None, m, 40, Sampling(2), eos_ids=set())
        assert set(ev.parts) == own | {"score", "select", "compact"}
        assert 0 < sum(ev.parts.values()) <= ev.seconds
        assert timings[f"eviction.{draft_part(name)}"] == ev.parts[draft_part(name)]


def test_bad_draft_setups_are_clear_errors(target):
    ids = prompt(40, 2)
    other_vocab = tiny_model(vocab=256, seed=2)
    with pytest.raises(LookaheadKVError, match="different tokenizer"):
        generate_ids(target, ids, None, get_method("speckv", draft_model=other_vocab), 36, Sampling(2))
    other_vocab.tokenizer_sha256 = None  # tokenizer unknown: the vocabulary sizes still tell them apart
    with pytest.raises(LookaheadKVError, match="vocabulary of 256 tokens"):
        generate_ids(target, ids, None, get_method("speckv", draft_model=other_vocab), 36, Sampling(2))
    with pytest.raises(LookaheadKVError, match="needs a draft model"):
        generate_ids(target, ids, None, "speckv", 36, Sampling(2))
    with pytest.raises(LookaheadKVError, match="draft_budget"):
        generate_ids(target, ids, None, get_method("laq", draft_budget=8), 36, Sampling(2))
    with pytest.raises(LookaheadKVError, match="k .draft tokens"):
        get_method("laq", k=-1)
    with pytest.raises(LookaheadKVError, match="no option draft_model"):
        get_method("snapkv", draft_model="x")


def test_a_reused_draft_serves_clones_of_one_prefill_only(target):
    pf = prefill(target, prompt(70, 3), record_rows=8)
    m = get_method("laq", window=8, draft_window=8, draft_budget=20, reuse_draft=True)
    calls = []
    real = m.draft_queries
    m.draft_queries = lambda model, pf: calls.append(1) or real(model, pf)
    fresh = get_method("laq", window=8, draft_window=8, draft_budget=20)
    for b in (20, 30):
        reused, new = evict(target, pf.clone(), m, b), evict(target, pf.clone(), fresh, b)
        assert all(torch.equal(a, c) for a, c in zip(reused.kept, new.kept))
    assert len(calls) == 1
    evict(target, prefill(target, prompt(70, 4), record_rows=8), m, 20)  # another prompt drafts anew
    assert len(calls) == 2
    follows = get_method("laq", window=8, draft_window=8, reuse_draft=True)  # its draft budget is the budget's
    real = follows.draft_queries
    follows.draft_queries = lambda model, pf: calls.append(1) or real(model, pf)
    for b in (20, 30, 30):
        evict(target, pf.clone(), follows, b)
    assert len(calls) == 4  # one draft per draft budget


def test_cli_draft_model_option(tmp_path):
    from click.testing import CliRunner

    from lookaheadkv.cli import main

    target_dir = save_tiny(tmp_path / "target", 0)
    draft_dir = save_tiny(tmp_path / "draft", 7, layers=2)
    other_dir = save_tiny(tmp_path / "other", 7, prefix="u")
    ctx = tmp_path / "c.txt"
    ctx.write_text(" ".join(f"t{i}" for i in prompt(80, 1)[0].tolist()))
    base = ["generate", "--model", target_dir, "--context-file", str(ctx), "--question", "t5 t6", "--budget", "40",
            "--window", "8", "--max-new-tokens", "4"]
    res = CliRunner().invoke(main, base + ["--method", "speckv", "--draft-model", draft_dir, "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["method"] == "speckv" and obj["kept_tokens"] == 40
    assert {"eviction.draft_prefill", "eviction.draft_decode", "eviction.draft_rows"} <= set(obj["timings_s"])
    for extra, match in [(["--method", "speckv", "--draft-model", other_dir], "different tokenizer"),
                         (["--method", "speckv"], "needs a draft model"),
                         (["--method", "snapkv", "--draft-model", draft_dir], "no option draft_model")]:
        res = CliRunner().invoke(main, base + extra)
        lines = [x for x in res.output.strip().splitlines() if x.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and match in lines[0], res.output


def test_speckv_refuses_a_draft_whose_tokenizer_differs_beyond_the_vocabulary_size(target, tmp_path):
    from lookaheadkv.models import load_model

    pairs = [(a, b) for a in "abcdefghij" for b in "abcdefghij"]
    one, _ = load_model(save_tiny(tmp_path / "one", 0, merges=pairs))
    same, _ = load_model(save_tiny(tmp_path / "same", 7, layers=2, merges=pairs))
    other, _ = load_model(save_tiny(tmp_path / "other", 7, layers=2, merges=pairs[::-1]))  # same vocabulary
    ids = prompt(40, 2)
    _, ev, _ = generate_ids(one, ids, None, get_method("speckv", draft_model=same, k=2), 36, Sampling(1))
    assert ev.parts["draft_rows"] > 0
    with pytest.raises(LookaheadKVError, match="different tokenizer"):
        generate_ids(one, ids, None, get_method("speckv", draft_model=other, k=2), 36, Sampling(1))
    unknown = tiny_model(layers=2, seed=7)  # same vocabulary size, no tokenizer to compare
    unknown.tokenizer_sha256 = None
    with pytest.raises(LookaheadKVError, match="cannot tell whether draft model"):
        generate_ids(target, ids, None, get_method("speckv", draft_model=unknown, k=2), 36, Sampling(1))


def test_clone_shares_tensors_and_a_drafting_eviction_of_it_leaves_the_prefill_unchanged(target):
    """Prefill.clone shares the cache tensors; LAQ on the clone (it appends draft rows, crops them, merges
    recordings, compacts) and decoding after it must leave the original prefill bit for bit as it was."""
    ids, mask = left_pad([prompt(60, 3)[0], prompt(41, 4)[0]])
    pf = prefill(target, ids, mask, record_rows=[4, 1])
    keys = [(layer.keys.clone(), layer.values.clone()) for layer in pf.cache.layers]
    sums = {r: {li: t.clone() for li, t in rec.sums.items()} for r, rec in pf.recordings.items()}
    c = pf.clone()
    assert all(a.keys.data_ptr() == b.keys.data_ptr() for a, b in zip(pf.cache.layers, c.cache.layers))
    ev = evict(target, c, method("laq", window=4, k=3, draft_window=4), 16)
    decode(target, c, ev.key_valid, set(), Sampling(max_new_tokens=4))
    assert kv_lengths(c.cache)[0] > 16 and kv_lengths(pf.cache) == [60] * 3
    for layer, (k, v) in zip(pf.cache.layers, keys):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    for r, rec in pf.recordings.items():
        assert rec.count == {li: r for li in range(3)}
        assert all(torch.equal(rec.sums[li], t) for li, t in sums[r].items())
