"""A trained module states what it cost in its lookahead.json: time (targets and training, also when the targets
came from another process and when the run resumed), hardware and prompts."""

import json

import torch
from conftest import tiny_model

from lookaheadkv import lookahead as la
from lookaheadkv import train as tr
from lookaheadkv.targets import TargetStore

TOK = type("Tok", (), {"eos_token_id": None})()


def prompts(k, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(20, 48, (1,), generator=g)),), generator=g) for _ in range(k)]


def config(**kw):
    return tr.TrainConfig(**{**dict(samples=10, response_tokens=6, epochs=2, batch_size=2, lr=1e-2, n=4, rank=4,
                                    alpha=8, val_share=0.3, checkpoint_every=2, evals=1), **kw})


def test_the_module_states_its_cost_when_another_process_collected_its_targets(tmp_path):
    model, ids = tiny_model(), prompts(10)
    store = TargetStore(tmp_path / "store", la.model_identity(model), 6)
    first = tr.collect_targets(model, TOK, ids, store, 6, progress=False)  # as `lookaheadkv targets` does
    assert first["prompts"] == 10 and store.collection_cost()["seconds"] > 0
    info = tr.train(model, TOK, tmp_path / "m", config(), prompt_ids=ids, targets_dir=tmp_path / "store",
                    progress=False)
    assert info["collection"]["prompts"] == 0  # nothing collected by the trainer itself
    cost = json.loads((tmp_path / "m" / "lookahead.json").read_text())["training"]["cost"]
    assert cost["hardware"].startswith("CPU") and "torch" in cost["hardware"]
    assert cost["targets_s"] == round(first["seconds"], 3) > 0 and cost["targets"]["prompts"] == 10
    assert cost["targets"]["hardware"] == [cost["hardware"]] and cost["targets"]["runs"] == 1
    assert cost["training_s"] > 0 and cost["total_s"] == round(cost["targets_s"] + cost["training_s"], 3)
    assert cost["prompts_trained"] == info["data"]["train"] > 0 and cost["steps"] == info["optimisation"]["steps"]
    assert cost["prompts_with_targets"] == 10
    # the bf16 copy that ships keeps the record
    la.save(model, la.load(tiny_model(), tmp_path / "m"), tmp_path / "bf16", training=info, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "lookahead.json").read_text())["training"]["cost"] == cost


def test_training_time_adds_up_over_a_resume(tmp_path):
    ids = prompts(10)
    stopped = tr.train(tiny_model(), TOK, tmp_path / "m", config(time_limit=0.0), prompt_ids=ids, progress=False)
    assert stopped["optimisation"]["stopped_by_time_limit"]
    before = torch.load(tmp_path / "m" / "checkpoint" / "state.pt", weights_only=False)["log"]["train_seconds"]
    info = tr.train(tiny_model(), TOK, tmp_path / "m", config(), prompt_ids=ids, progress=False)
    log = json.loads((tmp_path / "m" / "train_log.json").read_text())
    assert log["train_seconds"] >= before and info["cost"]["training_s"] == round(log["train_seconds"], 3)
    assert info["cost"]["targets"]["runs"] == 1  # the resume found every target in the store
