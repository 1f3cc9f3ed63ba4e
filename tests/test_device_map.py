"""Models spread over devices by accelerate (--device-map). This machine has no GPU, so two things are checked:

1. the whole pipeline under accelerate's dispatch hooks (every module given its execution device and its inputs
   moved there, as on several GPUs), with every block placed on the CPU: every method, our pipeline and
   transformers' generate, give exactly the undispatched model's tokens;
2. the per-layer stages on layers that live on another device than the prompt's mask: one layer on the
   `meta` device, where any mix with a CPU tensor raises. The results must stay on each layer's device and,
   for the CPU layers, equal the all-CPU results.

Not checked here (needs several GPUs): real cross-GPU copies and timings, the fused Triton kernel's device
guard, memory per device.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import left_pad, save_tiny, tiny_model
from test_lookahead import trained_like

from lookaheadkv import METHODS, LookaheadKVError, evicting, generate_ids, scoring
from lookaheadkv import cache as kvcache
from lookaheadkv.attention import forward_state, lookaheadkv_attention
from lookaheadkv.cli import main
from lookaheadkv.decode import Sampling
from lookaheadkv.importance import recall_per_sequence
from lookaheadkv.models import check_placement, devices, parse_device_map

OPTIONS = {"speckv": {"draft_model": None}, "laq": {"draft_budget": 40}}


def dispatched(model):
    """The model under accelerate's hooks, every block on the CPU (force_hooks: as with several devices)."""
    from accelerate import dispatch_model

    blocks = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)}}
    return dispatch_model(model, blocks, force_hooks=True, skip_keys=model._skip_keys_device_placement)


@pytest.fixture(scope="module")
def pair():
    plain, spread = tiny_model(), dispatched(tiny_model())
    for m in (plain, spread):
        trained_like(m)  # a lookahead module whose LoRA changes the rows
    return plain, spread


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_under_dispatch_hooks_gives_the_plain_models_tokens(pair, name):
    plain, spread = pair
    assert hasattr(spread.model.layers[0], "_hf_hook")  # the hooks are really there
    g = torch.Generator().manual_seed(3)
    ids, mask = left_pad([torch.randint(4, 128, (n,), generator=g) for n in (70, 55)])
    options = {"window": 8, **OPTIONS.get(name, {})} if name != "lookahead" else {}
    if name == "speckv":
        options["draft_model"] = tiny_model(seed=7)
    a, ev_a, _ = generate_ids(plain, ids, mask, name, 40, Sampling(10), set(), **options)
    b, ev_b, _ = generate_ids(spread, ids, mask, name, 40, Sampling(10), set(), **options)
    assert a == b and ev_a.kept_per_layer == ev_b.kept_per_layer
    with evicting(spread, name, budget=40, **options):
        hf = spread.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert [hf[i, ids.shape[1]:].tolist() for i in range(2)] == a


def test_evaluation_rows_under_dispatch_hooks_equal_the_plain_models(pair):
    from test_evaluation import TOK

    from lookaheadkv.evaluation import runner
    from lookaheadkv.methods import parse_methods

    plain, spread = pair
    kw = dict(tasks="niah_single_1", n=2, length=520, batch=2, model_name="tiny", progress=False)
    a, b = (runner.run_eval(m, TOK, methods=parse_methods("snapkv:window=8,pyramidkv:window=8,lookahead"),
                            budgets=[32], **kw)
            for m in (plain, spread))
    drop = ("eviction_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b]


def test_generate_and_bench_take_a_device_map(tmp_path):
    model_dir = save_tiny(tmp_path / "m", seed=0)
    (tmp_path / "doc.txt").write_text(" ".join(f"t{i}" for i in range(5, 60)))
    args = ["generate", "--model", model_dir, "--method", "snapkv", "--budget", "16", "--window", "4",
            "--context-file", str(tmp_path / "doc.txt"), "--question", "t3 t4", "--max-new-tokens", "6"]
    plain = CliRunner().invoke(main, args)
    spread = CliRunner().invoke(main, [*args, "--device-map", "auto"])  # this machine: every layer on the CPU
    assert plain.exit_code == spread.exit_code == 0, spread.output
    assert plain.stdout.splitlines()[0] == spread.stdout.splitlines()[0]
    bad = CliRunner().invoke(main, [*args, "--device-map", "everywhere"])
    assert bad.exit_code == 1 and "--device-map 'everywhere'" in bad.output and "Traceback" not in bad.output
    bench = CliRunner().invoke(main, ["bench", "--model", "tiny", "--device-map", "auto", "--contexts", "32",
                                      "--methods", "full,snapkv:window=4", "--budget", "8", "--decode-batches", "",
                                      "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "b")])
    assert bench.exit_code == 0, bench.output
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["meta"]["devices"] == ["cpu"]


def test_device_maps_are_parsed_and_offloading_is_refused(tmp_path):
    assert parse_device_map("auto") == "auto"
    (tmp_path / "m.json").write_text('{"model.layers": "cpu", "lm_head": "cpu"}')
    assert parse_device_map(str(tmp_path / "m.json")) == {"model.layers": "cpu", "lm_head": "cpu"}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(LookaheadKVError, match="mapping module names"):
        parse_device_map(str(tmp_path / "bad.json"))
    model = tiny_model()
    for where, refused in (({"a": 0, "b": 1}, None), ({"a": 0, "b": "cpu"}, "cpu"), ({"a": 0, "b": "disk"}, "disk"),
                           ({"a": "cpu"}, None)):
        model.hf_device_map = where
        if refused is None:
            check_placement(model)
        else:
            with pytest.raises(LookaheadKVError, match=f"offloads part of the model to {refused}"):
                check_placement(model)
    model.hf_device_map = {"a": 0, "b": 1, "c": 1}
    assert devices(model) == [torch.device("cuda:0"), torch.device("cuda:1")]
    del model.hf_device_map
    assert devices(model) == [torch.device("cpu")]


# ---------------------------------------------------------------------------------------------- per-layer devices

def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def test_scores_and_selection_stay_on_each_layers_device():
    g = torch.Generator().manual_seed(0)
    attn = [torch.rand(2, 4, 30, generator=g) for _ in range(3)]
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False
    forced = torch.zeros(2, 30, dtype=torch.bool)
    forced[:, -3:] = True
    ref = scoring.score(attn, 2, "max", 5, "mean", valid)
    got = scoring.score([attn[0], meta(attn[1]), attn[2]], 2, "max", 5, "mean", valid)
    assert [s.device.type for s in got] == ["cpu", "meta", "cpu"]
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    kept_ref = scoring.select(ref, [10, 10, 10], valid, forced)
    kept = scoring.select([ref[0], meta(ref[1]), ref[2]], [10, 10, 10], valid, forced)
    assert [k.device.type for k in kept] == ["cpu", "meta", "cpu"]
    assert torch.equal(kept[0], kept_ref[0]) and torch.equal(kept[2], kept_ref[2])


def test_compaction_keeps_each_layer_on_its_device():
    cache = kvcache.EvictableCache(tiny_model().config)
    g = torch.Generator().manual_seed(1)
    for i, layer in enumerate(cache.layers):
        k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
        if i == 1:
            k, v = meta(k), meta(v)
        layer.append(k, v, torch.arange(20, device=k.device)[None])
    idx = torch.arange(0, 20, 2).expand(1, 2, 10).contiguous()  # the scores' device: the CPU
    kvcache.compact(cache, [idx, idx, idx])
    assert [layer.keys.device.type for layer in cache.layers] == ["cpu", "meta", "cpu"]
    assert all(layer.keys.shape[-2] == 10 and layer.positions.device == layer.keys.device for layer in cache.layers)


def test_attention_takes_a_key_mask_made_on_another_device():
    q, k, v = (torch.empty(1, n, 5, 16, device="meta") for n in (4, 2, 2))
    valid = torch.ones(1, 5, dtype=torch.bool)  # made with the prompt, on the first device
    layer = type("Layer", (), {"layer_idx": 0, "scaling": 0.25, "is_causal": True, "num_key_value_groups": 2})()
    with forward_state(key_valid=[valid]):
        out, _ = lookaheadkv_attention(layer, q, k, v, None)
    assert out.device.type == "meta"


def test_recall_over_layers_on_several_devices():
    g = torch.Generator().manual_seed(2)
    truth = [torch.rand(1, 4, 30, generator=g) for _ in range(2)]
    kept = [torch.arange(10).expand(1, 2, 10).contiguous()] * 2
    valid = torch.ones(1, 30, dtype=torch.bool)
    got = recall_per_sequence([meta(truth[0]), truth[1]], kept, 10, 2, valid)  # the first layer elsewhere
    assert got.shape == (1,) and got.device.type == "meta"
