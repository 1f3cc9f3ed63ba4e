"""The importance-recall runner, against a direct reference computed from eager attention (tiny model)."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny, tiny_model

from lookaheadkv import generate_ids, get_method
from lookaheadkv.cli import main
from lookaheadkv.decode import Sampling
from lookaheadkv.errors import LookaheadKVError
from lookaheadkv.generate import build_prompt
from lookaheadkv.recall import (
    Sample,
    labelled,
    mean_ci,
    paired_summary,
    parse_methods,
    run_recall,
    summarize,
    token_f1,
)


class ByteTokenizer:
    """One token per byte (vocab 256), id 0 is EOS: enough to run the runner on a random-weight model."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [b or 1 for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids if i).decode(errors="replace")


@pytest.fixture(scope="module")
def byte_model():
    model = tiny_model(vocab=256, seed=3)
    model.generation_config.eos_token_id = 0
    return model


SAMPLES = [Sample("a", "test", "The lighthouse keeper counted ships. " * 3, "How many ships?"),
           Sample("b", "test", "Granite and basalt are rocks of fire; " * 3, "Which rocks?")]


def eager_truth(model, ids, response):
    """Per layer [Hkv, L] true importance from eager attention over [prompt; response] (GQA mean)."""
    eager = tiny_model(vocab=256, seed=3)
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    seq = torch.cat([ids, torch.tensor([response])], dim=1)
    att = eager(seq, output_attentions=True).attentions
    length = ids.shape[1]
    return [a[0, :, length:, :length].mean(dim=1).view(2, 2, length).mean(dim=1) for a in att]


def test_recall_rows_match_a_direct_reference(byte_model, tmp_path):
    tok = ByteTokenizer()
    out = tmp_path / "rows.jsonl"
    rows = run_recall(byte_model, tok, SAMPLES, {"snap": get_method("snapkv", window=8),
                                                              "stream": "streamingllm"}, [16, 40, 10_000],
                      response_tokens=10, answer_tokens=6, out=out, progress=False)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    method_rows = [r for r in rows if r["kind"] == "method"]
    assert len(method_rows) == 2 * 2 * 3
    for s in SAMPLES:
        ids = tok(build_prompt(tok, s.context, s.question), return_tensors="pt")["input_ids"]
        full, _, _ = generate_ids(byte_model, ids, None, "full", 10, Sampling(10), eos_ids={0})
        sample_row = next(r for r in rows if r["kind"] == "sample" and r["sample"] == s.id)
        assert sample_row["response_tokens"] == len(full[0]) > 0
        truth = eager_truth(byte_model, ids, full[0])
        for label, name in [("snap", "snapkv"), ("stream", "streamingllm")]:
            for b in (16, 40):
                opts = {"window": 8} if name == "snapkv" else {}
                _, ev, _ = generate_ids(byte_model, ids, None, name, b, Sampling(6), eos_ids={0}, **opts)
                shares = []
                for t, k in zip(truth, ev.kept):
                    top = t.topk(b, dim=-1).indices
                    shares += [len(set(top[h].tolist()) & set(k[0, h].tolist())) / b for h in range(2)]
                row = next(r for r in method_rows if r["sample"] == s.id and r["method"] == label
                           and r["budget"] == b)
                assert row["recall"] == pytest.approx(sum(shares) / len(shares), abs=1e-6)  # fp32 mean
                assert set(row["parts"]) >= {"score", "select", "compact"}
            whole = next(r for r in method_rows if r["sample"] == s.id and r["method"] == label
                         and r["budget"] == ids.shape[1])  # a budget past the prompt keeps all of it
            assert whole["recall"] == 1.0 and whole["f1"] == 1.0


def test_methods_do_not_leak_into_each_other_through_the_shared_prefill(byte_model):
    tok = ByteTokenizer()
    snap = get_method("snapkv", window=8)
    alone = run_recall(byte_model, tok, SAMPLES[:1], [snap], [16], 8, progress=False)
    others = ["knorm", get_method("h2o", window=8), snap]
    after = run_recall(byte_model, tok, SAMPLES[:1], others, [16], 8, progress=False)
    pick = [r["recall"] for r in alone if r.get("method") == "snapkv"]
    assert pick == [r["recall"] for r in after if r.get("method") == "snapkv"]


def test_token_f1_and_summary():
    assert token_f1("The Cat sat.", "cat sat") == 1.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("cat sat on mat", "cat") == token_f1("cat", "cat sat on mat") == 2 * 0.25 / 1.25
    m, ci = mean_ci([1.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(1.96 * 2 ** 0.5 / 2 ** 0.5)
    rows = [{"kind": "method", "method": "x", "budget": 8, "recall": v} for v in (0.25, 0.75)]
    assert "| x | 0.500 ± " in summarize(rows)


def test_method_specs_and_labels_are_checked():
    ms = parse_methods("snapkv,snapkv:window=8:pooling=avg")
    assert ms["snapkv:window=8:pooling=avg"].window == 8 and ms["snapkv:window=8:pooling=avg"].pooling == "avg"
    with pytest.raises(LookaheadKVError, match="no option"):
        parse_methods("snapkv:nope=1")
    with pytest.raises(LookaheadKVError, match="twice"):
        labelled(["snapkv", "snapkv"])


def test_paired_summary_is_the_mean_per_sample_difference():
    rows = [{"kind": "method", "method": m, "budget": 8, "sample": s, "recall": v}
            for m, s, v in [("a", "x", 0.5), ("a", "y", 0.25), ("b", "x", 0.75), ("b", "y", 0.75)]]
    m, ci = mean_ci([0.25, 0.5])
    assert f"| b | {m:+.3f} ± {ci:.3f} | 2 |" in paired_summary(rows, "a")


def test_cli_recall_writes_rows_args_and_a_summary_that_summarize_rewrites(tmp_path):
    out = tmp_path / "out"
    args = ["recall", "--model", save_tiny(tmp_path / "m", 0), "--methods", "snapkv:window=8,streamingllm",
            "--budgets", "16,32", "--samples", "2", "--families", "essays", "--min-tokens", "60", "--max-tokens", "80",
            "--response-tokens", "4", "--baselines", "streamingllm", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("sample") == 2
    assert {(r["method"], r["budget"]) for r in rows if r["kind"] == "method"} == {
        (m, b) for m in ("snapkv:window=8", "streamingllm") for b in (16, 32)}
    summary = (out / "summary.md").read_text()
    assert res.stdout.strip() == summary.strip() and "| snapkv:window=8 | " in summary
    assert json.loads((out / "args.json").read_text())["budgets"] == "16,32"
    again = CliRunner().invoke(main, ["recall", "--out", str(out), "--summarize", "--baselines", "streamingllm"])
    assert again.exit_code == 0, again.output
    assert (out / "summary.md").read_text().split("\n", 1)[1] == summary.split("\n", 1)[1]  # same tables
