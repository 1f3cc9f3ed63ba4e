"""The lookahead trainer on tiny random-weight models: fast target collection against a per-sequence reference,
the content-hash store, loss, one step, a whole run, resume, and the refusals."""

import json
import math
import types

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

from lookaheadkv import LookaheadKVError
from lookaheadkv import lookahead as la
from lookaheadkv import train as tr
from lookaheadkv.cli import main
from lookaheadkv.collect import collect_batch, plan_batches, prompt_key
from lookaheadkv.decode import Sampling, decode
from lookaheadkv.importance import importance_recall, recall_per_sequence
from lookaheadkv.prefill import prefill
from lookaheadkv.targets import TargetStore
from lookaheadkv.train_data import load_prompts, save_prompts

TOK = types.SimpleNamespace(eos_token_id=None)


def prompts(k, seed=0, low=20, high=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(low, high, (1,), generator=g)),), generator=g) for _ in range(k)]


def reference(model, eager, ids, cap, eos):
    """One prompt alone, the straightforward way: plain decode, then transformers' eager attention over prompt +
    response with output_attentions (fine at these lengths), the response rows onto the prompt averaged."""
    pf = prefill(model, ids[None])
    resp = decode(model, pf, None, eos, Sampling(cap))[0]
    if not resp:
        return None, None
    with torch.no_grad():
        att = eager(torch.cat([ids, torch.tensor(resp)])[None], output_attentions=True).attentions
    return resp, torch.stack([a[0, :, len(ids):, :len(ids)].mean(dim=1) for a in att])


@pytest.mark.parametrize("eos", [set(), set(range(3, 24))])  # no EOS; EOS often (rows leave the batch)
def test_fast_collection_equals_a_per_sequence_reference(eos):
    model, eager = tiny_model(), tiny_model()
    eager.set_attn_implementation("eager")
    ids = sorted(prompts(7, seed=5, low=8, high=60), key=len)
    got = collect_batch(model, ids, 24, eos, prefill_tokens=90, check_every=4)  # several prefill sub-batches
    answered = 0
    for x, t in zip(ids, got):
        resp, truth = reference(model, eager, x, 24, eos)
        if resp is None:
            assert t is None
            continue
        answered += 1
        assert t.response.tolist() == resp  # token for token
        assert t.truth.shape == (3, 4, len(x))
        torch.testing.assert_close(t.truth.double(), truth, rtol=0, atol=1e-5)
    assert answered >= 3


def test_rows_that_leave_the_batch_free_their_buffers_before_the_next_step(monkeypatch):
    import gc
    import weakref

    from lookaheadkv import collect

    old, steps = [], []
    select = collect.BufferLayer.select_rows

    def recording_select(layer, rows):
        old.append(weakref.ref(layer.buffers[0]))
        select(layer, rows)

    def checked_forward(*args, **kwargs):
        gc.collect()
        steps.append(sum(r() is not None for r in old))  # full-size buffers still alive at this step
        return forward(*args, **kwargs)

    forward = collect.forward
    monkeypatch.setattr(collect.BufferLayer, "select_rows", recording_select)
    monkeypatch.setattr(collect, "forward", checked_forward)
    collect_batch(tiny_model(), sorted(prompts(7, seed=5, low=8, high=60), key=len), 24, set(range(3, 24)),
                  prefill_tokens=90, check_every=4)
    assert old and steps[-1] == 0 and max(steps) == 0


def test_plan_batches_bound_the_buffer_and_group_by_length():
    lengths = [50, 10, 400, 30, 35, 300, 12]
    groups = plan_batches(lengths, 16, max_tokens=500)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert len(g) * (max(lengths[i] for i in g) + 16) <= 500 or len(g) == 1
    assert groups == [[1, 6, 3, 4, 0], [5], [2]]  # in order of length; 5 x (50 + 16) fits, 2 x (400 + 16) not


def test_the_store_survives_another_batch_size_order_and_subset(tmp_path):
    model = tiny_model()
    ids = prompts(6, seed=3)
    ident = la.model_identity(model)
    store = TargetStore(tmp_path, ident, 5)
    first = tr.collect_targets(model, TOK, ids, store, 5, max_batch_tokens=60, progress=False)
    assert first["prompts"] == 6 and first["batches"] > 2
    again = TargetStore(tmp_path, ident, 5)  # a later run: found on disk by content
    stats = tr.collect_targets(model, TOK, ids[::-1][:4], again, 5, max_batch_tokens=10_000, progress=False)
    assert stats["prompts"] == 0 and stats["already_stored"] == 4
    one = collect_batch(model, [ids[2]], 5, set())[0]
    got = again.get(prompt_key(ids[2]))
    assert torch.equal(got.response, one.response) and torch.equal(got.ids, ids[2])
    torch.testing.assert_close(got.truth.float(), one.truth.float(), rtol=1e-3, atol=1e-4)  # stored in fp16
    more = ids + prompts(2, seed=9)
    stats = tr.collect_targets(model, TOK, more, again, 5, max_batch_tokens=10_000, progress=False)
    assert stats["prompts"] == 2 and len(TargetStore(tmp_path, ident, 5)) == 8


def test_the_store_remembers_a_prompt_the_model_answered_nothing_to(tmp_path):
    model = tiny_model()
    ids = prompts(2, seed=4)
    t = collect_batch(model, ids[:1], 3, set())[0]
    store = TargetStore(tmp_path, la.model_identity(model), 3)
    store.put([(prompt_key(ids[0]), ids[0], t), (prompt_key(ids[1]), ids[1], None)])
    again = TargetStore(tmp_path, la.model_identity(model), 3)
    k0, k1 = prompt_key(ids[0]), prompt_key(ids[1])
    assert k1 in again and not again.answered(k1) and again.get(k1) is None
    assert again.answered(k0) and torch.equal(again.get(k0).response, t.response)


def test_the_store_refuses_another_model_or_response_cap(tmp_path):
    TargetStore(tmp_path, la.model_identity(tiny_model()), 5)
    with pytest.raises(LookaheadKVError, match="response cap of 5"):
        TargetStore(tmp_path, la.model_identity(tiny_model()), 6)
    with pytest.raises(LookaheadKVError, match="another model"):
        TargetStore(tmp_path, la.model_identity(tiny_model(seed=1)), 5)


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


def test_topk_loss_matches_a_per_head_reference_and_is_zero_on_exactly_the_set():
    g = torch.Generator().manual_seed(0)
    n_kv, k = 2, 4
    truth = torch.rand(2, 3, 4, 10, generator=g) ** 4
    truth[1, ..., :8] = 0  # left padding: the second sequence has 2 real positions, fewer than k
    pred = [torch.rand(2, 4, 10, generator=g) for _ in range(3)]
    ref = []
    for b in range(2):
        for layer in range(3):
            for h in range(n_kv):
                t = truth[b, layer, 2 * h:2 * h + 2].mean(0)
                p = pred[layer][b, 2 * h:2 * h + 2].mean(0)
                members = [j for j in t.argsort(descending=True)[:k].tolist() if t[j] > 0]
                ce = -sum(math.log(p[j] / p.sum()) for j in members) / len(members)
                ref.append(ce - math.log(len(members)))
    assert float(tr.topk_loss(pred, truth, n_kv, k)) == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    # uniform on each KV head's true top-k (its two query heads alike): the floor, 0
    kv = truth.view(2, 3, n_kv, 2, 10).mean(3)
    val, top = kv.topk(k, dim=-1)
    on_set = torch.zeros_like(kv).scatter_(-1, top, (val > 0).float())
    exact = [on_set[:, layer].repeat_interleave(2, dim=1) for layer in range(3)]
    assert float(tr.topk_loss(exact, truth, n_kv, k)) == pytest.approx(0.0, abs=1e-6)
    assert float(tr.topk_loss([x + 0.01 for x in exact], truth, n_kv, k)) > 0.01


def test_batched_recall_equals_the_one_sequence_form_and_ignores_pads():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(2, 3, 4, 30, generator=g)
    truth[1, ..., :12] = 0
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :12] = False
    kept = [torch.randperm(30, generator=g)[:8].sort().values.expand(2, 2, 8).clone() for _ in range(3)]
    got = recall_per_sequence(list(truth.unbind(1)), kept, 8, 2, valid)
    ref = importance_recall([truth[0, layer][None] for layer in range(3)], [k[:1] for k in kept], 8, 2)
    assert got[0].item() == pytest.approx(ref)
    # a sequence of 18 real tokens keeping all of them scores 1 at a budget above its length
    everything = [torch.arange(12, 30).expand(2, 2, 18).clone() for _ in range(3)]
    assert recall_per_sequence(list(truth.unbind(1)), everything, 25, 2, valid)[1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("topk", [(0.0, 64), (1.0, 4)])
def test_one_training_step_lowers_the_loss_on_that_batch(topk):
    model = tiny_model()
    model.requires_grad_(False)
    targets = collect_batch(model, sorted(prompts(4, seed=1), key=len), 8, set())
    mod = la.create(model, n=4, rank=4, alpha=8)
    params = mod.parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    before, _ = tr.batch_loss(model, mod, targets, grad=True, topk=topk)
    before.backward()
    assert float(mod.embeddings.grad.abs().sum()) > 0
    # every LoRA before the last layer's attention scores feeds the loss (the last layer's v, o and MLP cannot)
    grads = {n: p.grad for n, p in model.named_parameters() if ".lookahead." in n and "lora_B" in n}
    assert all(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "layers.2." not in n)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lookahead." not in n)  # model frozen
    opt.step()
    after, _ = tr.batch_loss(model, mod, targets, grad=False, topk=topk)
    assert after.item() < before.item()


def test_a_host_assembled_batch_is_the_targets_left_padded():
    """The prefetch thread's Batch: each prompt's ids and truth at the right end, zeros and False before them, the
    truth in the store's dtype; its loss is the one batch_loss computes from the targets themselves."""
    model = tiny_model()
    targets = [t for t in collect_batch(model, sorted(prompts(3, seed=4), key=len), 4, set()) if t is not None]
    for t in targets:
        t.truth = t.truth.half()
    b = tr.Batch.of(targets)
    length = max(len(t.ids) for t in targets)
    assert b.truth.dtype == torch.float16 and b.truth.shape[-1] == length == b.ids.shape[1] and len(b) == len(targets)
    for i, t in enumerate(targets):
        pad = length - len(t.ids)
        assert torch.equal(b.ids[i, pad:], t.ids) and not b.mask[i, :pad].any() and b.mask[i, pad:].all()
        assert torch.equal(b.truth[i, ..., pad:], t.truth) and not b.truth[i, ..., :pad].any()
    mod = la.create(model, n=4, rank=4, alpha=8)
    loss = tr.batch_loss(model, mod, b, grad=False)[0].item()
    assert loss == tr.batch_loss(model, mod, targets, grad=False)[0].item()


def config(**kw):
    args = dict(samples=10, epochs=2, batch_size=2, lr=1e-2, n=4, rank=4, alpha=8, response_tokens=6,
                val_share=0.3, checkpoint_every=2, evals=2)
    args.update(kw)
    return tr.TrainConfig(**args)


def run(model, out, cfg=None, **kw):
    return tr.train(model, TOK, out, cfg or config(), prompt_ids=prompts(10, seed=2), progress=False, **kw)


def test_train_writes_a_loadable_module_and_a_log(tmp_path):
    model = tiny_model()
    info = run(model, tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lookahead_embeddings.safetensors",
            "lookahead.json", "train_log.json", "targets"} <= files
    val = sum(tr.is_validation(prompt_key(x), 0.3) for x in prompts(10, seed=2))
    assert 0 < val < 10 and info["data"]["validation"] == val and info["data"]["train"] == 10 - val
    assert info["optimisation"]["steps"] == 2 * -(-(10 - val) // 2)
    assert info["validation"]["final"]["loss"] < info["validation"]["untrained"]["loss"]
    assert {"recall@32", "recall@64"} <= set(info["validation"]["final"])
    got = la.load(tiny_model(), tmp_path / "m")
    assert torch.equal(got.embeddings, model._lookahead_module.embeddings.detach())
    assert got.meta["training"]["data"]["prompts"] == 10


def test_a_warm_start_begins_where_its_module_ended_and_adds_its_cost(tmp_path):
    first = run(tiny_model(), tmp_path / "a", config(epochs=1, lr=1e-3))
    more = run(tiny_model(), tmp_path / "b", config(epochs=1, lr=1e-3, init=str(tmp_path / "a")),
               targets_dir=tmp_path / "a" / "targets")
    before, after = more["validation"]["untrained"], first["validation"]["final"]
    assert {**before, "step": 0} == {**after, "step": 0}  # the same weights on the same prompts
    assert more["validation"]["final"]["loss"] < first["validation"]["final"]["loss"]
    assert more["cost"]["init"]["steps"] == first["cost"]["steps"]
    assert more["cost"]["total_s"] == pytest.approx(more["cost"]["targets_s"] + more["cost"]["training_s"]
                                                    + first["cost"]["total_s"], abs=2e-3)
    assert more["config"]["lr"] == 1e-3  # given, it is kept
    # not given, a warm start goes on at the rate its module's schedule ended with
    again = run(tiny_model(), tmp_path / "e", config(epochs=1, lr=None, init=str(tmp_path / "a")),
                targets_dir=tmp_path / "a" / "targets")
    assert again["config"]["lr"] == pytest.approx(1e-3 * first["config"]["final_lr"])
    assert run(tiny_model(), tmp_path / "f", config(epochs=1, lr=None), targets_dir=tmp_path / "a" / "targets")[
        "config"]["lr"] == 3e-3
    with pytest.raises(LookaheadKVError, match="has n=4, rank=4, alpha=8; give the same"):
        run(tiny_model(), tmp_path / "c", config(init=str(tmp_path / "a"), rank=2))
    with pytest.raises(LookaheadKVError, match="no lookahead module is shipped"):
        run(tiny_model(), tmp_path / "d", config(init="shipped"))


def interrupt_at(monkeypatch, k):
    """tr.batch_loss raising KeyboardInterrupt at the k-th training step; returns the real one."""
    real, calls = tr.batch_loss, {"n": 0}

    def interrupted(model, mod, targets, grad, **kw):
        if grad:
            calls["n"] += 1
            if calls["n"] == k:
                raise KeyboardInterrupt
        return real(model, mod, targets, grad, **kw)

    monkeypatch.setattr(tr, "batch_loss", interrupted)
    return real


def test_resume_after_an_interruption_gives_the_same_module(tmp_path, monkeypatch):
    whole = tiny_model()
    run(whole, tmp_path / "a")
    real = interrupt_at(monkeypatch, 4)
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


def test_a_time_limit_leaves_a_checkpoint_and_the_rerun_finishes_the_same(tmp_path):
    whole = tiny_model()
    run(whole, tmp_path / "a")
    info = run(tiny_model(), tmp_path / "b", config(time_limit=0.0))
    assert info["optimisation"]["stopped_by_time_limit"] and info["optimisation"]["steps"] == 0
    assert not (tmp_path / "b" / "lookahead.json").exists()  # no module is written from a stopped run
    resumed = tiny_model()
    run(resumed, tmp_path / "b")
    assert torch.equal(resumed._lookahead_module.embeddings, whole._lookahead_module.embeddings)


def test_the_fitted_horizon_is_what_the_time_left_holds():
    assert tr._fitted_horizon(step=20, total=1000, left_s=100.0, step_s=0.5) == 20 + 190  # 5% margin
    assert tr._fitted_horizon(step=20, total=100, left_s=100.0, step_s=0.5) == 100  # never past the plan
    assert tr._fitted_horizon(step=20, total=1000, left_s=-5.0, step_s=0.5) == 20  # nothing left: stop here


def test_a_schedule_fitted_to_the_time_limit_decays_fully_and_resumes_on_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "FIT_STEPS", 4)
    monkeypatch.setattr(tr, "_fitted_horizon", lambda step, total, left_s, step_s: step + 2)
    cfg = config(time_limit=1e6, fit_time_limit=True, checkpoint_every=5)
    whole = tiny_model()
    info = run(whole, tmp_path / "a", cfg)
    assert info["optimisation"]["planned_steps"] == 10 and info["optimisation"]["schedule_steps"] == 6
    assert not info["optimisation"]["stopped_by_time_limit"] and (tmp_path / "a" / "lookahead.json").exists()
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["steps"][-1]["step"] == 6 and log["steps"][-1]["lr"] == pytest.approx(cfg.lr * cfg.final_lr)
    assert log["fitted"] == {"planned": 10, "steps": 6, "after": 4}
    # interrupted after the fit (checkpoint at step 5), the rerun ends on the same schedule and module
    real = interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model(), tmp_path / "b", cfg)
    monkeypatch.setattr(tr, "batch_loss", real)
    monkeypatch.setattr(tr, "_fitted_horizon", lambda *a: pytest.fail("a resumed run keeps its fitted schedule"))
    resumed = tiny_model()
    assert run(resumed, tmp_path / "b", cfg)["optimisation"]["schedule_steps"] == 6
    assert torch.equal(resumed._lookahead_module.embeddings, whole._lookahead_module.embeddings)


def test_a_resume_with_other_options_is_refused(tmp_path, monkeypatch):
    run(tiny_model(), tmp_path / "m", config(time_limit=0.0))
    with pytest.raises(LookaheadKVError, match="other n, rank"):
        run(tiny_model(), tmp_path / "m", config(n=6, rank=2))


def test_lookahead_tokens_without_a_lora_train_and_load(tmp_path):
    model = tiny_model()
    info = run(model, tmp_path / "m", config(rank=0))
    assert info["module"]["targets"] == [] and not (tmp_path / "m" / "adapter_model.safetensors").exists()
    assert not any(".lookahead." in n for n, _ in model.named_parameters())
    got = la.load(tiny_model(), tmp_path / "m")
    assert got.rank == 0 and torch.equal(got.embeddings, model._lookahead_module.embeddings.detach())


def test_prompt_files_round_trip(tmp_path):
    ids = [[5, 6, 7], [1], [9, 9]]
    save_prompts(tmp_path / "p.safetensors", ids, ["a", "b", "c"], {"seed": 3})
    got, fams, opts = load_prompts(tmp_path / "p.safetensors")
    assert [x.tolist() for x in got] == ids and fams == ["a", "b", "c"] and opts == {"seed": 3}
    (tmp_path / "bad").write_text("not a prompt file")
    with pytest.raises(LookaheadKVError, match="not a prompt file"):
        load_prompts(tmp_path / "bad")


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "0"], "--lr > 0"),
    (["--topk-weight", "-1"], "need --topk-weight >= 0"),
])
def test_train_refuses_bad_options_in_one_line(tmp_path, args, message):
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "m"), *args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m").exists()


def test_the_trainer_benchmark_reports_what_it_ran(tmp_path):
    from lookaheadkv.bench.trainer import (
        bench_collect,
        bench_forms,
        bench_generate,
        bench_reference,
        bench_steps,
        markdown,
        profile_tables,
    )

    model = tiny_model()
    ids = prompts(6, seed=8)
    tok = types.SimpleNamespace(eos_token_id=None, pad_token_id=0)
    coll, targets = bench_collect(model, tok, ids, 5, batch_tokens=200)
    assert coll["prompts"] == 6 and coll["answered"] == len(targets) == 6 and coll["batches"] >= 2
    assert coll["response_tokens_mean"] == 5  # no EOS: every response runs to the cap
    ref = bench_reference(model, tok, ids, 5, 4)
    assert ref["answered"] == 6 and ref["response_tokens_per_s"] == pytest.approx(30 / ref["seconds"])
    gen = [bench_generate(model, tok, ids, 5, 4, v) for v in ("dynamic", "static")]
    assert all("error" not in g and g["new_tokens_per_s"] > 0 for g in gen), gen
    steps, mod = bench_steps(model, targets, batch=2, steps=2, warmup=1)
    assert steps["steps"] == 2 and steps["prompts_per_s"] == pytest.approx(2 * steps["steps_per_s"])
    forms = {f["form"]: f for f in bench_forms(model, mod, targets, n=3, ks=(8,))}
    assert forms["fp32"]["relative_change"] == 0 and abs(forms["fp16"]["relative_change"]) < 1e-2
    text = markdown({"model": "tiny", "hardware": "cpu", "min_tokens": 20, "max_tokens": 48, "collection": coll,
                     "reference": ref, "generate": gen, "training": steps, "forms": list(forms.values())})
    assert "| lookaheadkv.collect" in text and "top-8 + even rest" in text and "| ratio" in text
    from lookaheadkv.collect import plan_batches

    biggest = max(len(g) for g in plan_batches([len(x) for x in ids], 5, 200))  # the collector's largest batch
    tables = profile_tables(model, mod, targets, ids, 5, 2, set(), 200, steps=2)
    assert tables["collect"].startswith(f"# collect_batch: {biggest} prompts") and "aten::" in tables["collect"]
    assert "; wall " in tables["collect"].splitlines()[0] and "; wall " in tables["train"].splitlines()[0]
    assert tables["train"].startswith("# 2 training steps at batch 2") and "autograd" in tables["train"].lower()


def test_train_killed_mid_run_and_started_again_gives_the_uninterrupted_module(tmp_path):
    """The real CLI in a subprocess, killed (SIGKILL) once a checkpoint is on disk, then run again: the module
    equals an uninterrupted run's (targets from the store, steps from the checkpoint)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import save_tiny
    from safetensors.torch import load_file

    model_dir = save_tiny(tmp_path / "model", seed=0)
    save_prompts(tmp_path / "p.safetensors", [x.tolist() for x in prompts(10, seed=2)], ["t"] * 10, {"max_tokens": 74})
    args = ["train", "--model", model_dir, "--prompts", str(tmp_path / "p.safetensors"), "--samples", "10",
            "--n", "4", "--rank", "4", "--alpha", "8", "--response-tokens", "6", "--batch-size", "2",
            "--epochs", "3", "--lr", "1e-2", "--evals", "1", "--checkpoint-every", "1"]
    whole = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    meta = json.loads((tmp_path / "whole" / "lookahead.json").read_text())
    assert meta["training"]["data"]["built_with"] == {"file": "p.safetensors", "max_tokens": 74}  # not the defaults
    slow = ("import time; import lookaheadkv.train as t; real = t.batch_loss; "
            "t.batch_loss = lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1]; "
            "from lookaheadkv.cli import main; main()")
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-c", slow, *args, "--out", str(out)], env={**os.environ, "PYTHONPATH":
                            path}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the training subprocess wrote no checkpoint in 120 s"
        time.sleep(0.01)
    time.sleep(0.5)  # a step or two further
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL and not (out / "lookahead.json").exists()
    again = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert again.exit_code == 0, again.output
    for name in ("lookahead_embeddings.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_builds_its_own_prompts_from_the_families(tmp_path):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "model", seed=0)  # a word-level tokenizer: the data's words map to ids < 128
    res = CliRunner().invoke(main, ["train", "--model", model_dir, "--samples", "8", "--min-tokens", "40",
                                    "--max-tokens", "120", "--families", "squad,instruct,retrieval,code",
                                    "--response-tokens", "4", "--n", "4", "--rank", "4",
                                    "--alpha", "8", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    info = la.load(tiny_model(), tmp_path / "m").meta["training"]
    fams = info["data"]["families"]
    assert info["data"]["prompts"] == 8 and sum(fams.values()) == info["data"]["train"]
    assert set(fams) <= {"squad", "instruct", "retrieval", "code"} and len(fams) >= 3


def test_collection_batches_run_in_an_order_whose_every_prefix_spreads_over_the_lengths():
    """A time limit keeps a prefix of the batches, which are sorted by prompt length: every prefix must reach
    every part of the length range (a shuffle had kept 4 of 29 batches, all over 1.3K tokens)."""
    for n in (1, 2, 7, 29, 64, 1000):
        for seed in (0, 1):
            order = tr.spread_order(n, seed)
            assert sorted(order) == list(range(n))
            for k in (2, 4, 8):  # the first k batches: no gap between them (round the end) over n/k + 1
                if k <= n:
                    first = sorted(order[:k])
                    gaps = [b - a for a, b in zip(first, first[1:])] + [first[0] + n - first[-1]]
                    assert max(gaps) <= n / k + 1, (n, seed, k, first)
    assert tr.spread_order(29, 0) == tr.spread_order(29, 0) != tr.spread_order(29, 1)


def test_a_batch_padded_further_to_its_graphs_bucket_gives_the_same_loss_and_gradients():
    """--cuda-graphs runs each batch left-padded to a bucket of positions, told it is padded (no host sync):
    loss and gradients equal the batch's own (float64, 1e-12), also for a batch with no pad of its own."""
    from lookaheadkv.graphed_step import GraphedStep

    model = tiny_model()
    model.requires_grad_(False)
    mod = la.create(model, n=4, rank=4, alpha=8)
    params = mod.parameters(model)
    with torch.no_grad():  # a LoRA that acts (B != 0)
        for p in params[1:]:
            p.normal_(0, 0.2)
    for p in params:
        p.requires_grad_(True)
    same = [torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    for seqs in (prompts(3, seed=5), same):
        b = tr.Batch.of([t for t in collect_batch(model, seqs, 5, set()) if t is not None])
        static = tr.Batch(torch.full((len(b), 64), 7), torch.ones(len(b), 64, dtype=b.mask.dtype),
                          torch.ones(len(b), *b.truth.shape[1:3], 64, dtype=b.truth.dtype))  # stale contents
        GraphedStep._fill(static, b)
        pad = 64 - b.ids.shape[1]
        assert not static.mask[:, :pad].any() and not static.truth[..., :pad].any() and not static.ids[:, :pad].any()
        grads = []
        for batch, padded in ((b, None), (static, True)):
            for p in params:
                p.grad = None
            loss = tr.batch_loss(model, mod, batch, grad=True, padded=padded)[0]
            loss.backward()
            grads.append((loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in params]))
        (a, ga), (c, gc) = grads
        assert float(a) == pytest.approx(float(c), rel=1e-12, abs=1e-12)
        for x, y in zip(ga, gc):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_cuda_graphs_are_refused_off_a_gpu_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["train", "--model", "tiny", "--cuda-graphs", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output == "error: --cuda-graphs needs a CUDA device, not --device cpu\n"
    assert not (tmp_path / "o").exists()
    with pytest.raises(LookaheadKVError, match="--cuda-graphs needs a CUDA device; the model is on cpu"):
        tr.train(tiny_model(), TOK, tmp_path / "o2", config(cuda_graphs=True), prompt_ids=prompts(4), progress=False)
    assert not (tmp_path / "o2").exists()
