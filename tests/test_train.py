"""The lookahead trainer on tiny random-weight models: targets, loss, one step, a whole run, resume."""

import types

import pytest
import torch
from conftest import tiny_model

from lookaheadkv import LookaheadKVError
from lookaheadkv import lookahead as la
from lookaheadkv import train as tr
from lookaheadkv.importance import true_importance
from lookaheadkv.prefill import prefill

TOK = types.SimpleNamespace(eos_token_id=None)


def prompts(k, seed=0, low=20, high=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(low, high, (1,), generator=g)),), generator=g) for _ in range(k)]


def test_batched_targets_equal_one_at_a_time():
    model = tiny_model()
    ids = prompts(3)
    batched = tr.collect_batch(model, ids, 6, set())
    for x, t in zip(ids, batched):
        alone = tr.collect_batch(model, [x], 6, set())[0]
        assert torch.equal(t.response, alone.response) and len(t.response) == 6
        torch.testing.assert_close(t.truth, alone.truth, rtol=0, atol=1e-3)  # stored in fp16
        ref = true_importance(model, prefill(model, x[None]), t.response[None])  # the core's definition
        torch.testing.assert_close(t.truth.float(), torch.stack([r[0] for r in ref]).float(), rtol=1e-3, atol=1e-4)
        assert t.truth.shape == (3, 4, len(x))


def test_kl_loss_matches_a_reference_and_is_zero_at_the_truth():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 3, 4, 10, generator=g)
    truth[1, ..., :3] = 0  # left padding
    pred = [torch.rand(2, 4, 10, generator=g) for _ in range(3)]
    p = torch.stack(pred, 1)
    p = p / p.sum(-1, keepdim=True)
    t = truth / truth.sum(-1, keepdim=True)
    ref = torch.nn.functional.kl_div(p.log(), t, reduction="none").sum(-1).mean()
    torch.testing.assert_close(tr.kl_loss(pred, truth), ref)
    assert float(tr.kl_loss([truth[:, i] * 3 for i in range(3)], truth)) == pytest.approx(0.0, abs=1e-6)


def test_one_training_step_lowers_the_loss_on_that_batch():
    model = tiny_model()
    model.requires_grad_(False)
    targets = tr.collect_batch(model, prompts(4, seed=1), 8, set())
    mod = la.create(model, n=4, rank=4, alpha=8)
    params = mod.parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = tr.batch_loss(model, mod, targets, grad=True)
    before.backward()
    assert float(mod.embeddings.grad.abs().sum()) > 0
    # every LoRA before the last layer's attention scores feeds the loss (the last layer's v, o and MLP cannot)
    grads = {n: p.grad for n, p in model.named_parameters() if ".lookahead." in n and "lora_B" in n}
    assert all(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "layers.2." not in n)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lookahead." not in n)  # model frozen
    opt.step()
    after = tr.batch_loss(model, mod, targets, grad=False)
    assert after.item() < before.item()


def run(model, out, **kw):
    args = dict(epochs=2, batch_size=2, lr=1e-2, n=4, rank=4, alpha=8, response_tokens=6, val_share=0.25,
                checkpoint_every=2, collect_batch_size=3, progress=False, prompt_ids=prompts(8, seed=2))
    args.update(kw)
    return tr.train(model, TOK, out, **args)


def test_train_writes_a_loadable_module_and_a_log(tmp_path):
    model = tiny_model()
    info = run(model, tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lookahead_embeddings.safetensors",
            "lookahead.json", "train_log.json", "targets"} <= files
    assert info["data"]["train"] + info["data"]["validation"] == 8 and info["optimisation"]["steps"] == 6
    assert info["loss"]["validation_final"] < info["loss"]["validation_untrained"]
    got = la.load(tiny_model(), tmp_path / "m")
    assert torch.equal(got.embeddings, model._lookahead_module.embeddings.detach())
    assert got.meta["training"]["data"]["prompts"] == 8


def test_resume_after_an_interruption_gives_the_same_module(tmp_path, monkeypatch):
    whole = tiny_model()
    run(whole, tmp_path / "a")
    real, calls = tr.batch_loss, {"n": 0}

    def interrupted(model, mod, targets, grad):
        if grad:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real(model, mod, targets, grad)

    monkeypatch.setattr(tr, "batch_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model(), tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint" / "state.pt").exists()
    monkeypatch.setattr(tr, "batch_loss", real)
    resumed = tiny_model()
    run(resumed, tmp_path / "b")
    assert torch.equal(resumed._lookahead_module.embeddings, whole._lookahead_module.embeddings)
    a = {n: p for n, p in whole.named_parameters() if ".lookahead." in n}
    b = {n: p for n, p in resumed.named_parameters() if ".lookahead." in n}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_targets_are_reused_and_refused_for_other_prompts(tmp_path):
    model = tiny_model()
    ids = prompts(4, seed=3)
    first = tr.collect_targets(model, TOK, ids, tmp_path, 5, progress=False)
    again = tr.collect_targets(model, TOK, ids, tmp_path, 5, progress=False)
    assert all(torch.equal(a.truth, b.truth) for a, b in zip(first, again))
    with pytest.raises(LookaheadKVError, match="other prompts or another model"):
        tr.collect_targets(model, TOK, prompts(4, seed=4), tmp_path, 5, progress=False)
