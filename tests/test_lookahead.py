"""LookaheadKV inference: single pass == two passes, prompt KV untouched, module save/load and refusals."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from lookaheadkv import LookaheadKVError, generate_ids, get_method
from lookaheadkv import lookahead as la
from lookaheadkv.decode import Sampling
from lookaheadkv.generate import evict
from lookaheadkv.prefill import prefill


def trained_like(model, n=6, seed=1):
    """A module whose LoRA really changes the lookahead rows (B != 0, as after training)."""
    mod = la.create(model, n=n, rank=4, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lookahead." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        mod.embeddings.copy_(torch.randn(mod.embeddings.shape, generator=g) * 0.5)
    return mod


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    base = tiny_model()  # same seed, same weights, never given a LoRA
    mod = trained_like(model)
    return model, base, mod


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left-padded second sequence
    return ids, mask


def test_single_pass_equals_two_passes_and_prompt_kv_is_the_base_models(setup):
    model, base, mod = setup
    ids, mask = batch()
    plain = prefill(base, ids, mask)
    one = prefill(model, ids, mask, extra=la.extra_rows(model, mod, 1))
    two_pf = prefill(model, ids, mask)
    two = la.lookahead_pass(model, mod, two_pf)
    for a, b, c in zip(plain.cache.layers, one.cache.layers, two_pf.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # bit-identical
        assert torch.equal(a.keys, c.keys) and torch.equal(a.values, c.values)
    assert torch.equal(one.next_logits.argmax(-1), plain.next_logits.argmax(-1))
    torch.testing.assert_close(one.next_logits, plain.next_logits, rtol=0, atol=1e-12)
    s1, s2 = one.extra.mean(), two.mean()
    assert len(s1) == 3 and s1[0].shape == (2, 4, 40)
    for x, y in zip(s1, s2):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert float(s1[0][1, :, :9].abs().max()) == 0.0  # no attention on pads


def test_the_lora_acts_on_the_lookahead_rows_only_when_switched_on(setup):
    model, base, mod = setup
    ids, _ = batch()
    with_lora = la.lookahead_pass(model, mod, prefill(model, ids)).mean()
    pf = prefill(base, ids)
    from lookaheadkv.prefill import attend_rows

    without = attend_rows(base, pf, inputs_embeds=mod.embeddings.detach().double()[None].expand(2, -1, -1)).mean()
    assert max(float((a - b).abs().max()) for a, b in zip(with_lora, without)) > 1e-3
    out_model = model(ids).logits  # outside the lookahead rows the LoRA is off: the base model exactly
    assert torch.equal(out_model, base(ids).logits)


def test_generate_with_budget_covering_the_prompt_reproduces_full_cache(setup):
    model, _, mod = setup
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(4))
    full, _, _ = generate_ids(model, ids, None, "full", 50, Sampling(10), set())
    for passes in (1, 2):
        tokens, ev, _ = generate_ids(model, ids, None, "lookahead", 50, Sampling(10), set(), passes=passes)
        assert tokens == full and ev.kept_per_layer == [50, 50, 50]


def test_eviction_is_the_same_in_one_and_two_passes(setup):
    model, _, _ = setup
    ids, mask = batch()
    kept = []
    for passes in (1, 2):
        m = get_method("lookahead", passes=passes)
        pf = prefill(model, ids, mask, extra=m.prefill_extra(model))
        ev = evict(model, pf, m, 16)
        assert [layer.keys.shape[-2] for layer in pf.cache.layers] == [16, 16, 16]
        kept.append(ev.kept)
    for a, b in zip(*kept):
        assert torch.equal(a, b)


def test_save_load_round_trips_exactly(setup, tmp_path):
    model, _, mod = setup
    la.save(model, mod, tmp_path / "m", training={"steps": 0})
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                            "lookahead_embeddings.safetensors", "lookahead.json"}
    fresh = tiny_model()
    got = la.load(fresh, tmp_path / "m")
    assert torch.equal(got.embeddings, mod.embeddings)
    ours = {n: p for n, p in model.named_parameters() if ".lookahead." in n}
    theirs = {n: p for n, p in fresh.named_parameters() if ".lookahead." in n}
    assert ours.keys() == theirs.keys() and len(ours) == 3 * 7 * 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids, _ = batch()
    a = la.lookahead_pass(model, mod, prefill(model, ids)).mean()
    b = la.lookahead_pass(fresh, got, prefill(fresh, ids)).mean()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert json.loads((tmp_path / "m" / "lookahead.json").read_text())["training"] == {"steps": 0}


def test_a_module_for_another_model_is_refused(setup, tmp_path):
    model, _, mod = setup
    la.save(model, mod, tmp_path / "m")
    with pytest.raises(LookaheadKVError, match="weights differ"):
        la.load(tiny_model(seed=5), tmp_path / "m")
    with pytest.raises(LookaheadKVError, match="architecture differ"):
        la.load(tiny_model(layers=2), tmp_path / "m")
    with pytest.raises(LookaheadKVError, match="no lookahead module is shipped"):
        la.shipped_module(tiny_model(seed=6))


def test_a_damaged_module_is_refused(setup, tmp_path):
    model, _, mod = setup
    d = la.save(model, mod, tmp_path / "m")
    (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(LookaheadKVError, match="damaged"):
        la.load(tiny_model(), d)
    d = la.save(model, mod, tmp_path / "e")
    save_file({"embeddings": load_file(str(d / "lookahead_embeddings.safetensors"))["embeddings"][:2]},
              str(d / "lookahead_embeddings.safetensors"))
    with pytest.raises(LookaheadKVError, match="embeddings of shape"):
        la.load(tiny_model(), d)
    (d / "lookahead.json").write_text("{not json")
    with pytest.raises(LookaheadKVError, match="damaged"):
        la.load(tiny_model(), d)
    (d / "lookahead.json").unlink()
    with pytest.raises(LookaheadKVError, match="not a lookahead module"):
        la.load(tiny_model(), d)


def test_identity_ignores_dtype_and_the_injected_lora():
    a = tiny_model()
    ident = la.model_identity(a)
    assert la.model_identity(tiny_model().float()) == ident
    assert la.model_identity(tiny_model().float().to(torch.bfloat16)) == ident  # fp32 weights loaded in bf16
    la.create(a, n=2)
    assert la.model_identity(a) == ident
    assert la.model_identity(tiny_model(seed=9))["weights_sha256"] != ident["weights_sha256"]


def test_identity_sees_a_fine_tune_of_any_single_tensor():
    model = tiny_model()
    ident = la.model_identity(model)["weights_sha256"]
    params = dict(model.named_parameters())
    assert len(params) == 3 * 9 + 3  # every tensor of the tiny Llama is tried
    with torch.no_grad():
        for name, p in params.items():
            before = p.clone()
            p.add_(0.01)  # a fine-tune of this tensor alone
            assert la.model_identity(model)["weights_sha256"] != ident, name
            p.copy_(before)
    assert la.model_identity(model)["weights_sha256"] == ident


@pytest.mark.parametrize("name,layers,hidden", [("smollm2-135m-instruct", 30, 576),
                                               ("qwen2.5-coder-1.5b-instruct", 28, 1536),
                                               ("qwen2.5-coder-0.5b-instruct", 24, 896)])
def test_each_shipped_module_is_complete(name, layers, hidden):
    d = la.MODULES_DIR / name
    meta = la._read_meta(d)
    assert (meta["n"], meta["rank"], meta["alpha"], meta["dtype"]) == (32, 8, 32, "bfloat16")
    assert meta["base_model"]["name"] == name
    assert meta["training"]["cost"]["hardware"].startswith("NVIDIA H200")  # what it cost, stated
    emb = load_file(str(d / "lookahead_embeddings.safetensors"))["embeddings"]
    assert emb.shape == (32, hidden) and emb.dtype == torch.bfloat16
    lora = load_file(str(d / "adapter_model.safetensors"))
    assert len(lora) == layers * 7 * 2  # A and B for q, k, v, o, gate, up, down in each layer
    assert json.loads((d / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.slow
def test_the_shipped_module_loads_for_the_default_model_with_no_training():
    from lookaheadkv.models import load_model

    model, _ = load_model()
    assert la.shipped_module(model).name == "smollm2-135m-instruct"
    mod = la.use_module(model)
    assert mod.n == 32 and la.use_module(model) is mod


def test_the_grouped_rows_lora_follows_a_change_of_the_lora_weights():
    """The single pass keeps stacked copies of the LoRA weights (lookahead.RowsLoRA); a weight changed in place
    (an optimizer step, a load) must be seen by the next single pass."""
    model = tiny_model()
    mod = trained_like(model)
    ids, mask = batch()
    prefill(model, ids, mask, extra=la.extra_rows(model, mod, 1))  # builds the stacked weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lookahead." in n and "lora_B" in n:
                p.mul_(-2.0)
    one = prefill(model, ids, mask, extra=la.extra_rows(model, mod, 1)).extra.mean()
    two = la.lookahead_pass(model, mod, prefill(model, ids, mask)).mean()
    for x, y in zip(one, two):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_the_single_pass_finds_its_lora_without_scanning_the_model(monkeypatch):
    """The LoRA layers and their sibling groups are found once, at injection: entering the single pass walked
    all ~2.7K modules of an 8B model twice (~20 ms of host time before the prefill's first kernel)."""
    model = tiny_model()
    mod = trained_like(model)
    ids, mask = batch()
    want = prefill(model, ids, mask, extra=la.extra_rows(model, mod, 1)).extra.mean()

    walk = torch.nn.Module.named_modules

    def no_scan(self, *a, **k):  # a first few modules (e.g. `model.device`'s first parameter), never all
        for i, item in enumerate(walk(self, *a, **k)):
            if i > 2:
                raise AssertionError("the model was scanned")
            yield item

    monkeypatch.setattr(torch.nn.Module, "named_modules", no_scan)
    got = prefill(model, ids, mask, extra=la.extra_rows(model, mod, 1)).extra.mean()
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert [len(g) for g in la.lora_groups(model)] == [3, 1, 2, 1] * model.config.num_hidden_layers
