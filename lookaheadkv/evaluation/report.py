"""Report of evaluation rows: a Markdown table (task x method x budget: mean score, 95% CI, n), averages per
task family, fidelity and importance recall, and PNG plots of score vs budget (one panel per task family,
and one per task)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import LookaheadKVError
from .metrics import mean_ci
from .runner import ROW_KEY, read_rows

FAMILY_ORDER = ("ruler", "qa", "fidelity")


def _cell(values: Sequence[float], scale: float) -> str:
    if not values:
        return "–"
    m, ci = mean_ci(values)
    ci_text = "" if ci != ci else f" ± {ci * scale:.1f}"  # nan for n = 1
    return f"{m * scale:.1f}{ci_text}"


def collect(rows: Iterable[dict], metric: str, by: str = "task") -> dict:
    """{(model, length, mode, group): {method: {budget: [values]}}} for one metric; group = task or family."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        v = r.get(metric)
        if v is None:
            continue
        out[(r["model"], r["length"], r["mode"], r[by])][r["method"]][r["budget"]].append(float(v))
    return out


def _order(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: (m != "full", m))


def table(rows: list[dict], metric: str = "score", by: str = "task", scale: float = 100.0) -> str:
    """One line per group x method; columns: n, then every budget (the full cache's value in each)."""
    data = collect(rows, metric, by)
    budgets = sorted({b for g in data.values() for per in g.values() for b in per if b is not None})
    head = f"| model | length | mode | {by} | method | n | " + " | ".join(f"B={b}" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (6 + len(budgets))]
    keys = sorted(data, key=lambda k: (k[0], k[1], k[2], _family_rank(k[3]), k[3]))
    for key in keys:
        per_method = data[key]
        for method in _order(per_method):
            per = per_method[method]
            if method == "full":
                vals = per.get(None, [])
                cells = [_cell(vals, scale)] * len(budgets)
                n = len(vals)
            else:
                cells = [_cell(per.get(b, []), scale) for b in budgets]
                n = max((len(v) for v in per.values()), default=0)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], method: str, metric: str = "score", by: str = "family",
                 scale: float = 100.0) -> str:
    """`method` minus each other evicting method, per sample (the same sample and budget): mean and 95% CI of
    the differences, one line per group x other method. Pairing removes the sample-to-sample spread that the
    plain table's intervals carry, so a small but consistent lead shows."""
    by_key: dict = defaultdict(dict)
    for r in rows:
        if r.get(metric) is not None and r["budget"] is not None:
            key = (r["model"], r["length"], r["mode"], r[by], r["budget"], r["sample"])
            by_key[key][r["method"]] = float(r[metric])
    diffs: dict = defaultdict(lambda: defaultdict(list))
    for (model, length, mode, group, budget, _), per in by_key.items():
        if method in per:
            for other, v in per.items():
                if other != method:
                    diffs[(model, length, mode, group, other)][budget].append(per[method] - v)
    budgets = sorted({b for d in diffs.values() for b in d})
    lines = [f"| model | length | mode | {by} | {method} minus | n | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|" + "---|" * (6 + len(budgets))]
    for key in sorted(diffs, key=lambda k: (k[0], k[1], k[2], _family_rank(k[3]), k[3], k[4])):
        per = diffs[key]
        cells = []
        for b in budgets:
            m, ci = mean_ci(per.get(b, []))
            cells.append("–" if m != m else f"{m * scale:+.1f}" + ("" if ci != ci else f" ± {ci * scale:.1f}"))
        n = max(len(v) for v in per.values())
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _family_rank(name: str) -> int:
    return FAMILY_ORDER.index(name) if name in FAMILY_ORDER else len(FAMILY_ORDER)


def plot(rows: list[dict], path: Path, by: str = "family", metric: str = "score", scale: float = 100.0) -> Path:
    """Score vs budget per method, one panel per group (family or task); the full cache as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = collect(rows, metric, by)
    keys = sorted(data, key=lambda k: (k[0], k[1], k[2], _family_rank(k[3]), k[3]))
    cols = min(4, len(keys)) or 1
    nrows = (len(keys) + cols - 1) // cols or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    methods = _order({m for k in keys for m in data[k]})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, key in zip(axes.flat, keys):
        for method in _order(data[key]):
            per = data[key][method]
            if method == "full":
                m, _ = mean_ci(per.get(None, []))
                ax.axhline(m * scale, color="black", ls="--", lw=1, label="full")
                continue
            bs = sorted(b for b in per if b is not None)
            stats = [mean_ci(per[b]) for b in bs]
            ys = [s[0] * scale for s in stats]
            err = [0.0 if s[1] != s[1] else s[1] * scale for s in stats]
            ax.errorbar(bs, ys, yerr=err, marker="o", ms=3, lw=1.2, capsize=2, color=colors[method], label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[3]} ({key[0]}, {key[1]}, {key[2]})", fontsize=9)
        ax.set_xlabel("KV budget (tokens per layer and head)", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16 if nrows == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shared_samples(rows: Sequence[dict]) -> list[dict]:
    """The rows of the samples that every method of their task and length has, so that each mean runs over the
    same samples (leases that ran out of time leave some methods with more), of the tasks that at least half the
    methods of their family and length ran (a task one lease added for a method and the full cache would
    otherwise enter their family means alone; a method missing a few tasks keeps its n smaller), and as many of
    them for every task of a family and length (the first ones, in row order), so that a family's mean weighs its
    tasks alike, as RULER's mean of its tasks does."""
    have: dict = defaultdict(lambda: defaultdict(set))
    order: dict = defaultdict(dict)  # (task, length) -> its samples in row order (a dict keeps insertion order)
    family = {}
    for r in rows:
        k = (r["task"], r["length"])
        have[k][r["method"]].add(r["sample"])
        order[k][r["sample"]] = None
        family[k] = (r["family"], r["length"])
    methods: dict = defaultdict(set)  # (family, length) -> every method that ran any of its tasks
    for k, per in have.items():
        methods[family[k]] |= set(per)
    have = {k: per for k, per in have.items() if 2 * len(per) >= len(methods[family[k]])}
    common = {k: set.intersection(*per.values()) for k, per in have.items()}
    shared = {k: [s for s in order[k] if s in common[k]] for k in have}
    least: dict = {}
    for k, samples in shared.items():
        least[family[k]] = min(least.get(family[k], len(samples)), len(samples))
    keep = {k: set(samples[:least[family[k]]]) for k, samples in shared.items()}
    return [r for r in rows if r["sample"] in keep.get((r["task"], r["length"]), ())]


def write_report(results: Sequence[str | Path], folder: str | Path) -> Path:
    """report.md (tables) and scores_by_family.png / scores_by_task.png in `folder`; a results file that holds
    no evaluation row is refused before anything is written."""
    rows = []
    for p in results:
        found = [r for r in read_rows(p) if all(k in r for k in (*ROW_KEY, "family", "score"))]
        if not found:
            raise LookaheadKVError(f"{p} holds no evaluation rows (the JSONL rows `lookaheadkv eval` writes)")
        rows += found
    rows = shared_samples(rows)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot(rows, folder / "scores_by_family.png", by="family")
    plot(rows, folder / "scores_by_task.png", by="task")
    samples = len({(r["model"], r["sample"], r["mode"]) for r in rows})
    text = [
        "# Evaluation report", "",
        f"{len(rows)} rows, {samples} samples, from {', '.join(str(p) for p in results)}. Cells: mean ± half-width "
        "of the 95% confidence interval (normal), in percent; n = samples; B = KV budget (entries kept per layer "
        "and KV head). The full cache (no eviction) is shown in every budget column. Only the samples every "
        "method has, and as many for every task of a family and length.", "",
        "## Score by task family (mean over the family's samples)", "", table(rows, "score", "family"), "",
        "![score vs budget by family](scores_by_family.png)", "",
        "## Score by task", "",
        "RULER: string match (all references, or any one for qa_1/qa_2); qa_single_doc / qa_multi_doc: token F1; "
        "essay_*: ROUGE-L against the full cache's output.", "", table(rows, "score", "task"), "",
        "![score vs budget by task](scores_by_task.png)", "",
        "## Paired differences: lookahead minus each other method (same samples), by family", "",
        "Mean ± 95% CI of the per-sample difference in points; an interval that excludes 0 is a lead (or a lag) "
        "beyond the sampling noise.", "", paired_table(rows, "lookahead"), "",
        "## Fidelity: token F1 against the full cache's answer, by family", "", table(rows, "fidelity", "family"), "",
        "## Importance recall at the budget (against the full-cache answer's attention), by family", "",
        table(rows, "recall", "family"), "",
    ]
    if any("em" in r for r in rows):
        text += ["## Exact match (QA)", "", table([r for r in rows if "em" in r], "em", "task"), ""]
    path = folder / "report.md"
    path.write_text("\n".join(text), encoding="utf-8")
    return path
