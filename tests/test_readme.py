"""The README's promises stay executable: its commands exist and CI runs its test command."""

import re
import sys
from pathlib import Path

import pytest

from lookaheadkv import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (ROOT / script).exists()


def test_readme_lists_every_registered_method():
    for name in METHODS:
        assert f"| `{name}` |" in README, name


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_shows_generate_and_pipelines_first():
    first, second = PYTHON_BLOCKS[:2]
    assert "with lookaheadkv.evicting(model" in first and "model.generate(**inputs" in first
    assert 'pipeline("text-generation"' in first
    assert "from lookaheadkv import load_model, generate" in second  # our own generate comes after


@pytest.mark.slow
def test_readme_generate_and_pipeline_example_runs(tmp_path, monkeypatch, capsys):
    from lookaheadkv.demo import document

    (tmp_path / "report.txt").write_text(document("The access code is 4829.", depth=0.05)[:800])
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON_BLOCKS[0].replace("max_new_tokens=64", "max_new_tokens=8"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    number = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
    stats = re.findall(rf"^{number} {number} {number}$", out, re.M)
    kept, ratio, seconds = (float(x) for x in stats[-1])
    assert kept == 128 and 0 < ratio < 1 and seconds > 0
    answers = out.replace(" ".join(stats[-1]), "").split()
    assert len(answers) >= 2  # both the generate and the pipeline answer printed something


def test_every_command_the_readme_shows_exists():
    from lookaheadkv.cli import main

    shown = set(re.findall(r"(?m)^\s*lookaheadkv (\w+)", "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))))
    assert {"recall", "eval", "report", "bench", "train", "generate"} <= shown
    assert shown <= set(main.commands)
    assert "python -m lookaheadkv.recall" not in README


def test_docs_eval_tables_are_the_committed_rows():
    # docs/eval.md once kept LAQ's superseded rows after results/eval had replaced them
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_doc

    doc = (ROOT / "docs" / "eval.md").read_text(encoding="utf-8")
    assert eval_doc.render(doc) == doc, "docs/eval.md is stale: run python scripts/eval_doc.py"
