"""The README's promises stay executable: its commands exist and CI runs its test command."""

import re
from pathlib import Path

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


def test_every_command_the_readme_shows_exists():
    from lookaheadkv.cli import main

    shown = set(re.findall(r"(?m)^\s*lookaheadkv (\w+)", "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))))
    assert {"recall", "eval", "report", "bench", "train", "generate"} <= shown
    assert shown <= set(main.commands)
    assert "python -m lookaheadkv.recall" not in README
