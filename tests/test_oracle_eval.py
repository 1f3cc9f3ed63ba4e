"""scripts/oracle_eval.py: the oracle keeps exactly the true top-B of the full cache's own answer, and at a budget
covering the prompt it answers as the full cache does."""

import sys
from pathlib import Path

from conftest import tiny_model
from test_evaluation import TOK

from lookaheadkv.evaluation.runner import Evaluator, encode_sample
from lookaheadkv.evaluation.tasks import make_sample

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import oracle_eval  # noqa: E402


def test_the_oracle_keeps_the_answers_true_top_b_and_is_exact_at_a_covering_budget():
    model = tiny_model()
    ev = Evaluator(model, TOK, "tiny", {}, [16, 32, 100000])
    samples = [make_sample("niah_single_1", 520, 0, i, lambda s: sum(map(len, encode_sample(TOK, s))))
               for i in range(2)]
    rows = oracle_eval.oracle_rows(ev, samples, max_new=6)
    assert [(r["method"], r["budget"]) for r in rows[:4]] == [("full", None), ("oracle", 16), ("oracle", 32),
                                                                ("oracle", 100000)]
    full = {r["sample"]: r for r in rows if r["method"] == "full"}
    assert len(full) == 2 and all(f["answer"] for f in full.values())
    for r in rows:
        # recall is judged against the same answer's attention: the oracle's kept set is its top-B, entry for entry
        assert r["recall"] == 1.0, (r["budget"], r["recall"])
        if r["budget"] == 100000:
            assert (r["answer"], r["fidelity"]) == (full[r["sample"]]["answer"], 1.0)
