"""Tables and a plot from the training runs of scripts/gpu/pipeline.sh (their train_log.json files).

    python scripts/train_report.py RESULTS_DIR --out-train results/train --out-ablations results/lookahead

- OUT_TRAIN/runs.md: every run (main, learning-rate sweep, ablations): data, steps, throughput, validation loss
  and importance recall before and after;
- OUT_ABLATIONS/ablations.md: the ablations against their baseline (the sweep's best run), same data and steps;
- OUT_TRAIN/validation.png: validation recall@64 and loss over the steps of every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BUDGETS = (32, 64, 128, 256)


def load(folder: Path) -> dict[str, dict]:
    return {p.name.removesuffix(".train_log.json"): json.loads(p.read_text())
            for p in sorted(folder.glob("*.train_log.json"))}


def describe(name: str, t: dict) -> str:
    c = t["config"]
    return (f"n={c['n']}, rank={c['rank']}, cap={c['response_tokens']}, lr={c['lr']:g}, batch={c['batch_size']}, "
            f"epochs={c['epochs']}")


def row(name: str, log: dict) -> str:
    t = log["training"]
    v0, v1 = t["validation"]["untrained"], t["validation"]["final"]
    thr = t["throughput"]
    rec = " | ".join(f"{v1.get(f'recall@{b}', float('nan')):.3f}" for b in BUDGETS)
    return (f"| {name} | {describe(name, t)} | {t['data']['train']} | {t['data']['validation']} | "
            f"{t['optimisation']['steps']} | {thr['train_steps_per_s'] or float('nan'):.2f} | "
            f"{v0.get('loss', float('nan')):.4f} → {v1.get('loss', float('nan')):.4f} | "
            f"{v0.get('recall@64', float('nan')):.3f} | {rec} |")


HEADER = ("| run | configuration | train prompts | validation | steps | steps/s | validation KL (untrained → final) | "
          "recall@64 untrained | " + " | ".join(f"recall@{b}" for b in BUDGETS) + " |")


def tables(runs: dict[str, dict]) -> tuple[str, str]:
    sep = "|" + "---|" * (8 + len(BUDGETS))
    order = sorted(runs, key=lambda k: (not k.startswith("main"), not k.startswith("sweep"), k))
    note = ("Validation: a content-hash share of each run's own training prompts (never trained on); recall = share "
            "of the true top-B prompt positions per layer and KV head that the module's scores keep.")
    every = ["# Training runs", "", note, "", HEADER, sep] + [row(k, runs[k]) for k in order]
    sweep = {k: v for k, v in runs.items() if k.startswith("sweep")}
    abl = {k: v for k, v in runs.items() if k.startswith("abl_")}
    if not sweep:
        return "\n".join(every), ""
    base = max(sweep, key=lambda k: sweep[k]["training"]["validation"]["final"].get("recall@64", -1))
    b = sweep[base]["training"]["validation"]["final"]
    lines = ["# Ablations (the reviewers' questions), on validation recall", "",
             f"All on the same {sweep[base]['training']['data']['train']} training prompts and the same "
             f"{sweep[base]['training']['data']['validation']} validation prompts, one epoch, the learning rate of "
             f"the best sweep run; baseline = {base} ({describe(base, sweep[base]['training'])}).", "",
             "| run | configuration | " + " | ".join(f"recall@{x}" for x in BUDGETS) + " | recall@64 − baseline | "
             "validation KL |", "|---|---|" + "---|" * (len(BUDGETS) + 2)]
    for k in [base] + sorted(abl):
        v = runs[k]["training"]["validation"]["final"]
        cells = " | ".join(f"{v.get(f'recall@{x}', float('nan')):.3f}" for x in BUDGETS)
        diff = v.get("recall@64", float("nan")) - b.get("recall@64", float("nan"))
        lines.append(f"| {k} | {describe(k, runs[k]['training'])} | {cells} | {diff:+.3f} | {v.get('loss', 0):.4f} |")
    return "\n".join(every), "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, log in runs.items():
        val = [v for v in log["validation"] if "loss" in v]
        steps = [v["step"] for v in val]
        style = dict(lw=2.5 if name == "main" else 1.2, ls="-" if name == "main" or name.startswith("sweep") else "--")
        axes[0].plot(steps, [v["recall@64"] for v in val], label=name, **style)
        axes[1].plot(steps, [v["loss"] for v in val], label=name, **style)
    axes[0].set(xlabel="training step", ylabel="validation importance recall@64", title="recall@64")
    axes[1].set(xlabel="training step", ylabel="validation KL(true || predicted)", title="loss", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="folder with *.train_log.json")
    ap.add_argument("--out-train", type=Path, required=True)
    ap.add_argument("--out-ablations", type=Path, required=True)
    a = ap.parse_args()
    runs = load(a.results)
    if not runs:
        raise SystemExit(f"error: no *.train_log.json in {a.results}")
    every, abl = tables(runs)
    a.out_train.mkdir(parents=True, exist_ok=True)
    (a.out_train / "runs.md").write_text(every + "\n")
    if abl:
        a.out_ablations.mkdir(parents=True, exist_ok=True)
        (a.out_ablations / "ablations.md").write_text(abl + "\n")
    plot(runs, a.out_train / "validation.png")
    print(every + "\n\n" + abl)


if __name__ == "__main__":
    main()
