"""scripts/readme_table.py: README tables from evaluation rows only, paired differences, the module's cost, and the
README block it fills (nothing but "not measured yet" without rows)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import readme_table  # noqa: E402


def rows():
    out = []
    for s in range(4):
        for task, family in (("niah_single_1", "ruler"), ("qa_single_doc", "qa")):
            base = dict(model="m", task=task, family=family, length=4096, sample=f"{task}-{s}", mode="aware")
            out.append({**base, "method": "full", "budget": None, "score": 1.0})
            for b in (64, 128):
                out.append({**base, "method": "lookahead", "budget": b, "score": 0.5 + 0.1 * (s % 2)})
                out.append({**base, "method": "speckv:k=32:draft_model=d", "budget": b, "score": 0.25 + 0.1 * (s % 2)})
    return out


def test_tables_hold_the_means_and_the_paired_differences():
    text = readme_table.render(rows(), None, None)
    assert "| method | ruler 4K B=64 | ruler 4K B=128 | qa 4K B=64 | qa 4K B=128 |" in text
    assert "| full | 100.0 | 100.0 | 100.0 | 100.0 |" in text and "| lookahead | 55.0 | 55.0 | 55.0 | 55.0 |" in text
    assert "| speckv | 30.0 |" in text  # labels lose their options
    assert "| speckv | +25.0 ± 0.0 | +25.0 ± 0.0 |" in text  # paired: the same lead on every sample
    assert "; 4 samples per task" in text
    assert "B=64" in readme_table.render(rows(), None, [64]) and "B=128" not in readme_table.render(rows(), None, [64])
    # a method with samples the others lack (a lease ran out) is averaged over the shared ones only
    extra = [dict(r, sample="niah_single_1-9", score=0.0) for r in rows() if r["sample"] == "niah_single_1-0"
             and r["method"] != "lookahead"]
    assert "| speckv | 30.0 |" in readme_table.render(rows() + extra, None, None)
    # a task with more shared samples than another of its family and length gives only as many (its first ones)
    more = [dict(r, sample="niah_single_1-9", score=0.0) for r in rows() if r["sample"] == "niah_single_1-0"]
    other = [dict(r, task="niah_single_2", sample=f"n2-{r['sample'][-1]}") for r in rows()
             if r["task"] == "niah_single_1" and r["sample"] != "niah_single_1-3"]
    text = readme_table.render(rows() + more + other, None, None)
    assert "; 3-4 samples per task" in text and "| lookahead | 53.3 |" in text  # (.5 + .6 + .5) x 2 tasks / 6


def test_the_readme_block_is_filled_and_empty_rows_write_no_number(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb\n")
    module = tmp_path / "mod"
    module.mkdir()
    cost = dict(total_s=300.0, hardware="NVIDIA H200", targets_s=200.0, prompts_with_targets=900, training_s=100.0,
                steps=110, prompts_trained=850)
    (module / "lookahead.json").write_text(json.dumps({"dtype": "bfloat16", "training": {"cost": cost}}))
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    readme_table.main([str(path), "--module", str(module), "--readme", str(readme), "--key", "x"])
    text = readme.read_text()
    assert text.startswith("a\n<!-- results:x -->\nMean score") and text.endswith("<!-- /results:x -->\nb\n")
    assert "trained in 300 s on NVIDIA H200 (200 s collecting targets for 900 prompts" in text
    readme_table.main([str(tmp_path / "none.jsonl"), "--readme", str(readme), "--key", "x"])
    assert readme.read_text() == "a\n<!-- results:x -->\nnot measured yet\n<!-- /results:x -->\nb\n"
