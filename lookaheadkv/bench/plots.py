"""Plots of a results dict: eviction overhead vs context length per method; decode throughput vs batch."""

from __future__ import annotations

from pathlib import Path

FLOOR = 0.1  # percent: overheads at or below it (noise, or negative) are drawn here on the log axis


def plot_all(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    title = f"{result['meta']['model']} ({result['meta']['weights'].split(':')[0]}), {result['meta']['device']}"
    rows = [r for r in result["ttft"] if r["method"] != "full"]
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label in dict.fromkeys(r["method"] for r in rows):
            rs = sorted((r for r in rows if r["method"] == label), key=lambda r: r["context"])
            # The definition, paired within repeats; values inside the noise (<= 0.1%) sit on the floor.
            ys = [max(FLOOR, 100 * r["overhead"]) for r in rs]
            ax.plot([r["context"] for r in rs], ys, "--" if "/rows-" in label else "-", marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"eviction overhead, % of full-cache TTFT (floor {FLOOR}%)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "overhead.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    dec = result.get("decode", [])
    if dec:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label in dict.fromkeys(d["cache"] for d in dec):
            ds = sorted((d for d in dec if d["cache"] == label), key=lambda d: d["batch"])
            style = "--" if label.startswith("plain") else ":" if label == "full" else "-"
            ax.plot([d["batch"] for d in ds], [d["tokens_per_s"] for d in ds], style, marker="o", label=label)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens / s")
        ax.set_title(f"{title}, {dec[0]['context']}-token prompt", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(out / "decode.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made
