"""Every common decoder architecture, on a tiny random model built from its config (float64): exact at a
budget covering the prompt, the expected entries per layer after eviction, original positions (sliding
windows moving on while decoding), the lookahead LoRA on the right modules, and the refused ones."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lookaheadkv import LookaheadKVError, evicting, generate_ids
from lookaheadkv import lookahead as la
from lookaheadkv.architectures import check, kv_heads, lora_targets
from lookaheadkv.attention import install
from lookaheadkv.decode import Sampling
from lookaheadkv.prefill import _cache_kw, attend_rows, prefill

WINDOW = 12  # sliding window of the sliding models: prompts of 40 tokens run well past it
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),  # full, full, sliding x2
    "qwen3": dict(head_dim=16),
    "mistral": dict(sliding_window=WINDOW),  # every layer sliding
    "phi3": dict(sliding_window=WINDOW),  # fused qkv_proj / gate_up_proj, sliding
    "gemma2": dict(head_dim=16, sliding_window=WINDOW),  # sliding/global alternating, soft-capped logits
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
SLIDING = {"qwen2": [None, None, WINDOW, WINDOW], "mistral": [WINDOW] * 4, "phi3": [WINDOW] * 4,
           "gemma2": [WINDOW, None] * 2, "gemma3_text": [WINDOW, None] * 2}


MOE = ("qwen2_moe", "mixtral")  # their experts' grouped matmul has no float64 kernel: float32


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **BASE, **ARCHS[arch])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model.float() if arch in MOE else model.double()


def windows(arch: str) -> list[int | None]:
    return SLIDING.get(arch, [None] * 4)


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    model = build(request.param)
    plain = build(request.param)  # same weights, the model's own attention (eager on Gemma 2: soft-capping)
    return request.param, model, plain


def prompt(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, n, **kw):
    out = model.generate(ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), max_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out


def test_budget_covering_the_prompt_reproduces_hf_greedy(arch):
    name, model, plain = arch
    ids = prompt()
    ref = hf_greedy(plain, ids, 10)[0, 40:].tolist()
    with evicting(model, "snapkv", budget=40) as ev:
        ours = hf_greedy(model, ids, 10)[0, 40:].tolist()
    assert ours == ref
    tokens, _, _ = generate_ids(install(model), ids, None, "snapkv", 40, Sampling(10), set())
    assert tokens[0] == ref
    # sliding layers hold at most window - 1 entries, like transformers' own sliding cache
    assert ev.last.kept_per_layer == [40 if w is None else w - 1 for w in windows(name)]


def test_eviction_keeps_the_expected_entries_per_layer_and_kv_head(arch):
    name, model, _ = arch
    ids = prompt()
    n_new = 20  # past the sliding window: kept entries expire and sliding layers are trimmed as they go
    with evicting(model, "snapkv", budget=16, window=4) as ev:
        out = hf_greedy(model, ids, n_new, return_dict_in_generate=True)
    assert ev.last.kept_per_layer == [16 if w is None else min(16, w - 1) for w in windows(name)]
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    for layer, w in zip(cache.layers, windows(name)):
        held = 16 + n_new - 1 if w is None else w - 1  # the last new token is never fed back
        assert layer.keys.shape == (1, kv_heads(model), held, layer.keys.shape[-1])
        assert layer.values.shape[:3] == layer.keys.shape[:3]  # per KV head, no repeat_kv copies
    assert cache.get_seq_length() == 40 + n_new - 1  # the logical length: decoding counts original positions


def masked_reference(model, ids, keep, n):
    """Greedy decoding of the full-cache model in which every prompt slot but `keep` is hidden from the new
    tokens, at their true positions: what eviction to `keep` must compute."""
    length = ids.shape[1]
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    tok = out.logits[:, -1].argmax(-1)
    toks = [int(tok)]
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, keep] = 1
    for step in range(n - 1):
        m = torch.cat([mask, torch.ones(1, step + 1, dtype=torch.long)], dim=1)
        out = model(tok[:, None], attention_mask=m, position_ids=torch.tensor([[length + step]]),
                    use_cache=True, **{_cache_kw(model): cache})
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1)
        toks.append(int(tok))
    return toks


def test_decoding_after_eviction_is_at_the_original_positions(arch):
    """StreamingLLM without sinks keeps the last `budget` slots in every layer and head, so eviction equals
    hiding the other slots; sliding layers keep the last min(budget, window - 1) and let them expire."""
    name, model, plain = arch
    ids = prompt(seed=2)
    for budget in (8, 24) if name in SLIDING else (8,):  # below and above a sliding layer's 11 entries
        with evicting(model, "streamingllm", budget=budget, sinks=0):
            ours = hf_greedy(model, ids, 16)[0, 40:].tolist()
        assert ours == masked_reference(plain, ids, torch.arange(40 - budget, 40), 16)
        # renumbering the kept entries from 0 (a cache that forgets its positions) computes something else
        assert ours != hf_greedy(plain, ids[:, -budget:], 16)[0, budget:].tolist()


def test_a_sliding_layer_lets_any_kept_entries_expire_at_their_own_positions():
    """One sliding layer, one KV head: whatever SnapKV keeps inside the window, decoding equals the full model
    with the other slots hidden, the window moving past the kept entries one by one."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mistral", **dict(BASE, num_hidden_layers=1, num_key_value_heads=1),
                               sliding_window=WINDOW)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    ids = prompt(seed=4)
    with evicting(model, "snapkv", budget=6, window=2, kernel=1) as ev:
        ours = hf_greedy(model, ids, 16)[0, 40:].tolist()
    kept = ev.last.kept[0][0, 0]
    assert kept.min() >= 40 - (WINDOW - 1) and len(kept) == 6 and kept.tolist() != list(range(34, 40))
    assert ours == masked_reference(model, ids, kept, 16)


def test_each_kv_head_of_a_sliding_layer_sees_its_own_entries_inside_the_window():
    from lookaheadkv.cache import EvictableLayer

    layer = EvictableLayer(sliding_window=4)
    layer.append(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8), torch.arange(6)[None])
    layer.keep(torch.tensor([[[3, 5], [4, 5]]]))  # head 0 keeps positions 3 and 5, head 1 keeps 4 and 5
    layer.seal(padded=False)
    layer.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), torch.tensor([[6]]))
    # row at position 6 sees positions > 2: head 0 (query heads 0, 1) sees 3, 5, 6; head 1 sees 4, 5, 6
    assert layer.mask(n_heads=4)[0, :, 0].tolist() == [[True, True, True]] * 2 + [[True, True, True]] * 2
    layer.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), torch.tensor([[7]]))
    # at position 7 the window starts at 4: head 0 has lost position 3, head 1 still sees 4
    assert layer.mask(n_heads=4)[0, :, 0].tolist() == [[False, True, True, True]] * 2 + [[True, True, True, True]] * 2
    assert layer.keys.shape[-2] == 3  # trimmed back to window - 1 entries after the call
    assert layer.positions[0].tolist() == [[5, 6, 7], [5, 6, 7]]


def test_a_left_padded_batch_equals_single_runs(arch):
    name, model, _ = arch
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (40, 27)]
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 40 - len(p):], mask[i, 40 - len(p):] = p, 1
    with evicting(model, "snapkv", budget=20, window=4) as ev:
        batch = hf_greedy(model, ids, 8, attention_mask=mask)[:, 40:].tolist()
        singles = [hf_greedy(model, p[None], 8)[0, len(p):].tolist() for p in prompts]
    assert batch == singles
    assert len(ev.evictions) == 3


def test_lookahead_lora_sits_on_the_architectures_own_projections(arch):
    name, model, _ = arch
    model = build(name)  # a fresh copy: the LoRA stays in the model
    expected = {"phi3": ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"),
                "qwen2_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj")}
    targets = lora_targets(model)
    assert targets == expected.get(name, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"))
    mod = la.create(install(model), n=4, rank=2, alpha=4)
    wrapped = {n.rsplit(".", 3)[0] for n, _ in model.named_parameters() if ".lora_A.lookahead." in n}
    assert len(wrapped) == 4 * len(targets) and {w.rsplit(".", 1)[-1] for w in wrapped} == set(targets)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lookahead." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    ids = prompt()
    one = prefill(model, ids, extra=la.extra_rows(model, mod, 1)).extra.mean()
    two = la.lookahead_pass(model, mod, prefill(model, ids)).mean()
    for a, b in zip(one, two):  # the rows hook on fused modules computes what PEFT's adapter does
        torch.testing.assert_close(a, b, rtol=1e-5 if name in MOE else 1e-9, atol=1e-6 if name in MOE else 1e-12)


def test_a_lora_target_the_architecture_lacks_is_an_error():
    with pytest.raises(LookaheadKVError, match="Phi3ForCausalLM has no gate_proj, q_proj"):
        la.create(build("phi3"), n=2, targets=("q_proj", "gate_proj"))


def test_gemma_scales_the_lookahead_rows_like_token_embeddings():
    model = install(build("gemma3_text"))
    mod = la.create(model, n=3, rank=2, alpha=4)  # B = 0: the LoRA adds nothing yet
    tokens = torch.tensor([[5, 17, 99]])
    with torch.no_grad():
        mod.embeddings.copy_(model.get_input_embeddings().weight[tokens[0]])
    ids = prompt()
    rows = la.lookahead_pass(model, mod, prefill(model, ids)).mean()
    same = attend_rows(model, prefill(model, ids), input_ids=tokens).mean()
    for a, b in zip(rows, same):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gemma3_multimodal_reads_its_nested_text_config():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    cfg = Gemma3Config(text_config=dict(text, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2),
                       vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=16, patch_size=8),
                       mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126)
    model = Gemma3ForConditionalGeneration(cfg).double().eval()
    assert not hasattr(model.config, "num_key_value_heads") or model.config.num_key_value_heads is None
    assert kv_heads(model) == 2
    ids = prompt()
    ref = hf_greedy(model, ids, 8)[0, 40:].tolist()
    with evicting(model, "snapkv", budget=40):
        assert hf_greedy(model, ids, 8)[0, 40:].tolist() == ref
    with evicting(model, "snapkv", budget=16, window=4) as ev:
        hf_greedy(model, ids, 8)
    assert ev.last.kept_per_layer == [11, 16, 11, 16]
    targets = lora_targets(model)
    la.create(install(model), n=2, rank=2, alpha=4)
    lora = [n for n, _ in model.named_parameters() if ".lora_A.lookahead." in n]
    assert len(lora) == 4 * len(targets) and not any("vision" in n for n in lora)


REFUSED = {
    "llama4_text": (dict(attention_chunk_size=8, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                         interleave_moe_layer_step=1, no_rope_layers=[1, 0, 1, 0]),
                    "llama4_text .* is not supported: it has chunked_attention layers"),
    "qwen3_next": (dict(head_dim=16), "qwen3_next .* is not supported: it has linear_attention layers"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_an_unsupported_architecture_is_refused_with_one_line(name):
    extra, message = REFUSED[name]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **BASE, **extra))
    for attempt in (lambda: check(model), lambda: evicting(model, "snapkv", 16).__enter__()):
        with pytest.raises(LookaheadKVError, match=message) as e:
            attempt()
        assert "\n" not in str(e.value)
