"""A trained module in the form it ships in: bf16 tensors, its training record (cost: time, hardware, prompts) in
lookahead.json, train_log.json beside it.

    python3 scripts/gpu/ship_module.py --model qwen2.5-coder-1.5b-instruct --run /tmp/lkv/M/work/main \
        --out /tmp/lkv/M/work/main_bf16 [--device cuda]

A run its time limit stopped wrote no module, only its last checkpoint and train_log.json: that checkpoint is
shipped then, with the log's record (which says `stopped_by_time_limit` and the steps made of those planned).
Copy the result to lookaheadkv/modules/<model>/ to ship it: it is found there by the model's identity.
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
    cost = training.get("cost", {})
    print(f"{a.out}: from {src}; cost {cost.get('total_s')} s ({cost.get('targets_s')} s targets, "
          f"{cost.get('training_s')} s training) on {cost.get('hardware')}, {cost.get('prompts_trained')} prompts"
          f"{'; STOPPED by its time limit' if training.get('optimisation', {}).get('stopped_by_time_limit') else ''}")


if __name__ == "__main__":
    main()
