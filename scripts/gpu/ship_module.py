"""A trained module in the form it ships in: bf16 tensors, its training record (cost: time, hardware, prompts) in
lookahead.json, train_log.json beside it.

    python3 scripts/gpu/ship_module.py --model qwen2.5-coder-1.5b-instruct --run /tmp/lkv/M/work/main \
        --out /tmp/lkv/M/work/main_bf16 [--device cuda]

A run its time limit stopped wrote no module, only its last checkpoint and train_log.json: that checkpoint is
shipped then, with the log's record (which says `stopped_by_time_limit` and the steps made of those planned).
Copy the result to lookaheadkv/modules/<model>/ to ship it: it is found there by the model's identity. A warm start
(`train --init`) that ended below its start on validation recall@64 gets a BELOW_START file beside it: the pipeline
then keeps the module it started from (its snapshot, its evaluation rows, what comes back).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def pick(run: Path) -> tuple[Path, dict]:
    """(module directory, training record) of a finished or a time-stopped run."""
    log = json.loads((run / "train_log.json").read_text()) if (run / "train_log.json").exists() else {}
    if (run / "lookahead.json").exists():
        return run, json.loads((run / "lookahead.json").read_text()).get("training") or log.get("training", {})
    if (run / "checkpoint" / "lookahead.json").exists():
        return run / "checkpoint", log.get("training", {})
    raise SystemExit(f"{run} holds no module and no checkpoint")


def below_start(training: dict) -> bool:
    """A warm start whose validation recall@64 ended below where it began (its starting module's)."""
    v = training.get("validation") or {}
    start, end = (v.get(k, {}).get("recall@64") for k in ("untrained", "final"))
    return bool((training.get("cost") or {}).get("init")) and None not in (start, end) and end < start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)

    import torch

    from lookaheadkv import lookahead as la
    from lookaheadkv.models import load_model

    src, training = pick(a.run)
    model, _ = load_model(a.model, device=a.device)
    mod = la.load(model, src)
    la.save(model, mod, a.out, training=training, dtype=torch.bfloat16)
    if (a.run / "train_log.json").exists():
        shutil.copy(a.run / "train_log.json", a.out / "train_log.json")
    (a.out / "BELOW_START").unlink(missing_ok=True)
    below = below_start(training)
    if below:
        v = training["validation"]
        (a.out / "BELOW_START").write_text(f"validation recall@64 {v['untrained']['recall@64']:.4f} at the start, "
                                           f"{v['final']['recall@64']:.4f} at the end\n")
    cost = training.get("cost", {})
    print(f"{a.out}: from {src}; cost {cost.get('total_s')} s ({cost.get('targets_s')} s targets, "
          f"{cost.get('training_s')} s training) on {cost.get('hardware')}, {cost.get('prompts_trained')} prompts"
          f"{'; STOPPED by its time limit' if training.get('optimisation', {}).get('stopped_by_time_limit') else ''}"
          f"{'; BELOW ITS START (not shipped)' if below else ''}")


if __name__ == "__main__":
    main()
