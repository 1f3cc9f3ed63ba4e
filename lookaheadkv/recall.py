"""Importance recall of eviction methods on held-out prompts, and the held-out prompts themselves.

For each sample the prompt is prefilled once (recording every row count the methods need); the model's own
greedy full-cache response gives the true importance (importance.py); then every method x budget evicts a
clone of that prefill and is scored by importance recall: the share of the true top-B prompt positions that
it keeps, averaged over layers and KV heads. Optionally each evicted clone also decodes its answer, scored by
token F1 against the full-cache answer.

Held-out samples come only from the TEST split of data.py (never trained on): SQuAD questions with
distractor paragraphs, HotpotQA questions (their own paragraphs plus others), and essays with a planted fact.

    lookaheadkv recall --methods snapkv,laq:k=8 --budgets 32,64,128 --samples 40 --out results/x
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from tqdm import tqdm

from . import data
from .cache import crop
from .data import TokenCounter, fill_with_distractors
from .decode import Sampling, decode
from .errors import LookaheadKVError
from .evaluation.metrics import mean_ci, token_f1
from .generate import build_prompt, evict
from .importance import importance_recall, true_importance
from .methods import Method, get_method, parse_methods
from .models import DEFAULT_MODEL, load_model
from .prefill import prefill

FAMILIES = ("squad", "hotpotqa", "essays")


@dataclass
class Sample:
    id: str
    family: str
    context: str
    question: str
    answers: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Held-out samples (test split only)

_CODE_NAMES = ("Aurora", "Basalt", "Cobalt", "Dune", "Ember", "Fjord", "Granite", "Harbor", "Iris", "Juniper",
               "Kestrel", "Lantern", "Meadow", "Nimbus", "Orchid", "Pylon", "Quartz", "Raven", "Summit", "Tundra")



def _squad(rng: random.Random, target: int, count: TokenCounter) -> Sample:
    items = data.squad("test")
    q = items[rng.randrange(len(items))]
    pool = sorted({x["context"] for x in items if x["title"] != q["title"]})
    context = fill_with_distractors([q["context"]], pool, target, count, rng)
    return Sample(f"squad:{q['id']}", "squad", context, q["question"], q["answers"])


def _hotpotqa(rng: random.Random, target: int, count: TokenCounter) -> Sample:
    items = data.hotpotqa("test")
    q = items[rng.randrange(len(items))]
    gold = [f"{t}: {p}" for t, p in q["paragraphs"]]
    others = [items[rng.randrange(len(items))] for _ in range(40)]
    pool = sorted({f"{t}: {p}" for o in others if o["id"] != q["id"] for t, p in o["paragraphs"]})
    context = fill_with_distractors(gold, pool, target, count, rng)
    return Sample(f"hotpotqa:{q['id']}", "hotpotqa", context, q["question"], [q["answer"]])


def _essay(rng: random.Random, target: int, count: TokenCounter) -> Sample:
    """Test-split essays from a random one on, cut at a sentence near `target` tokens, a fact planted inside."""
    essays = data.essays("test")
    names = sorted(essays)
    start = rng.randrange(len(names))
    sentences: list[str] = []
    total = 0
    for name in names[start:] + names[:start]:
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(essays[name].split())):
            if total >= target:
                break
            sentences.append(sent)
            total += count(sent) + 1
    name, code = rng.choice(_CODE_NAMES), f"{rng.randrange(10**5, 10**6)}"
    fact = f"The secret access code of the {name} project is {code}."
    sentences.insert(rng.randint(1, max(1, len(sentences) - 1)), fact)
    return Sample(f"essays:{names[start]}:{name}:{code}", "essays", " ".join(sentences),
                  f"What is the secret access code of the {name} project?", [code])


_BUILDERS = {"squad": _squad, "hotpotqa": _hotpotqa, "essays": _essay}


def check_sample_options(families: Sequence[str], min_tokens: int, max_tokens: int) -> None:
    bad = set(families) - set(_BUILDERS)
    if bad or not families:
        raise LookaheadKVError(f"unknown sample families {sorted(bad)}; choose from {', '.join(FAMILIES)}")
    if not 0 < min_tokens <= max_tokens:
        raise LookaheadKVError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")


def heldout_samples(tokenizer, n: int, min_tokens: int = 1000, max_tokens: int = 3000,
                    families: Sequence[str] = FAMILIES, seed: int = 0) -> list[Sample]:
    """`n` held-out samples from the test split, cycling through `families`, each context ~min..max tokens
    long (a length drawn uniformly per sample). Deterministic for a given seed."""
    check_sample_options(families, min_tokens, max_tokens)
    rng = random.Random(seed)
    count = TokenCounter(tokenizer)
    out = []
    for i in range(n):
        family = families[i % len(families)]
        out.append(_BUILDERS[family](rng, rng.randint(min_tokens, max_tokens), count))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics

def labelled(methods: Iterable[str | Method] | dict[str, str | Method]) -> dict[str, Method]:
    """{label: Method}: a dict keeps its labels; names and instances are labelled by their name."""
    items = methods.items() if isinstance(methods, dict) else ((m if isinstance(m, str) else m.name, m)
                                                                for m in methods)
    out: dict[str, Method] = {}
    for label, m in items:
        if label in out:
            raise LookaheadKVError(f"method label {label!r} given twice; label them apart (a dict of label: method)")
        out[label] = get_method(m)
    return out


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return (ids | {tokenizer.eos_token_id}) - {None}


@torch.no_grad()
def run_recall(model, tokenizer, samples: Sequence[Sample], methods: Iterable[str | Method] | dict[str, str | Method],
               budgets: Sequence[int], response_tokens: int = 96, answer_tokens: int = 0,
               out: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Score every method x budget on every sample; returns (and appends to `out`, JSONL) one row per
    sample ("kind": "sample": the full-cache response) and one per method x budget ("kind": "method":
    recall, eviction seconds and parts, and with answer_tokens > 0 the answer and its F1 against the
    full-cache answer of the same length)."""
    ms = labelled(methods)
    device = next(model.parameters()).device
    n_kv = model.config.num_key_value_heads
    rows_wanted = sorted({r for m in ms.values() if m.evicts for r in m.recorded()})
    eos = eos_ids(model, tokenizer)
    sink = None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        sink = open(out, "a", encoding="utf-8")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    bar = tqdm(total=len(samples) * len(ms) * len(budgets), desc="recall", disable=not progress, unit="eviction")
    try:
        for s in samples:
            prompt = build_prompt(tokenizer, s.context, s.question)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            t0 = time.perf_counter()
            pf = prefill(model, ids, record_rows=rows_wanted)
            prefill_s = time.perf_counter() - t0
            response = decode(model, pf, None, eos, Sampling(response_tokens))[0]
            crop(pf.cache, pf.length)  # decoding appended the response; the prompt cache is as before
            reference = tokenizer.decode(response, skip_special_tokens=True).strip()
            emit({"kind": "sample", "sample": s.id, "family": s.family, "prompt_tokens": pf.length,
                  "prefill_s": prefill_s, "response_tokens": len(response), "response": reference,
                  "answers": s.answers})
            if not response:  # no answer, no true importance: nothing to score against
                bar.update(len(ms) * len(budgets))
                continue
            truth = true_importance(model, pf, torch.tensor([response], device=device))
            ref_answer = tokenizer.decode(response[:answer_tokens], skip_special_tokens=True).strip()
            for label, m in ms.items():
                for b in budgets:
                    c = pf.clone()
                    ev = evict(model, c, m, b)
                    row = {"kind": "method", "sample": s.id, "family": s.family, "method": label,
                           "method_name": m.name, "budget": ev.budget, "prompt_tokens": pf.length,
                           "response_tokens": len(response),
                           "recall": importance_recall(truth, ev.kept, ev.budget, n_kv),
                           "eviction_s": ev.seconds, "parts": dict(getattr(ev, "parts", {}) or {})}
                    if answer_tokens > 0:
                        ans = decode(model, c, ev.key_valid, eos, Sampling(answer_tokens))[0]
                        row["answer"] = tokenizer.decode(ans, skip_special_tokens=True).strip()
                        row["f1"] = token_f1(row["answer"], ref_answer)
                    emit(row)
                    del c
                    bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return rows


def summarize(rows: Iterable[dict], metric: str = "recall") -> str:
    """A Markdown table: one line per method label, one column per budget, mean ± 95% CI of `metric`."""
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    budgets: set[int] = set()
    for r in rows:
        if r.get("kind") == "method" and metric in r:
            cells[r["method"]][r["budget"]].append(r[metric])
            budgets.add(r["budget"])
    order = sorted(budgets)
    lines = [f"| {metric} (mean ± 95% CI) | " + " | ".join(f"B={b}" for b in order) + " | n |",
             "|---|" + "---|" * (len(order) + 1)]
    for label, per in cells.items():
        vals = [mean_ci(per[b]) for b in order]
        n = max(len(per[b]) for b in order)
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f} ± {ci:.3f}" for m, ci in vals) + f" | {n} |")
    return "\n".join(lines)


def complete_samples(rows: list[dict]) -> list[dict]:
    """The rows of the samples that every method x budget reached (a stopped run leaves its last one partial)."""
    per: Counter = Counter(r["sample"] for r in rows if r.get("kind") == "method")
    full = max(per.values(), default=0)
    done = {s for s, n in per.items() if n == full}
    return [r for r in rows if r["sample"] in done]


def paired_summary(rows: Iterable[dict], baseline: str, metric: str = "recall") -> str:
    """A Markdown table of each method's per-sample difference to `baseline` (same sample and budget):
    mean ± 95% CI. Pairing removes the sample-to-sample spread that the plain table's intervals carry."""
    by: dict[tuple[str, int, str], float] = {}
    budgets: set[int] = set()
    labels: list[str] = []
    for r in rows:
        if r.get("kind") == "method" and metric in r:
            by[(r["method"], r["budget"], r["sample"])] = r[metric]
            budgets.add(r["budget"])
            if r["method"] not in labels:
                labels.append(r["method"])
    order = sorted(budgets)
    lines = [f"| {metric} minus {baseline} (paired, mean ± 95% CI) | " + " | ".join(f"B={b}" for b in order)
             + " | n |", "|---|" + "---|" * (len(order) + 1)]
    for label in labels:
        if label == baseline:
            continue
        cells, n = [], 0
        for b in order:
            d = [v - by[(baseline, b, s)] for (lab, bb, s), v in by.items()
                 if lab == label and bb == b and (baseline, b, s) in by]
            m, ci = mean_ci(d)
            n = max(n, len(d))
            cells.append(f"{m:+.3f} ± {ci:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def timing_summary(rows: Iterable[dict]) -> str:
    """Mean eviction seconds per method label, and each part's mean over the evictions that ran it (with
    reuse_draft only a sample's first eviction drafts; "(n)" says how many did)."""
    sec: dict[str, list[float]] = defaultdict(list)
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("kind") == "method":
            sec[r["method"]].append(r["eviction_s"])
            for k, v in (r.get("parts") or {}).items():
                parts[r["method"]][k].append(v)
    lines = ["| method | evictions | eviction s (mean) | parts: mean s over the evictions that ran them (n) |",
             "|---|---|---|---|"]
    for label, v in sec.items():
        p = ", ".join(f"{k} {sum(x) / len(x):.3f} ({len(x)})" for k, x in parts[label].items())
        lines.append(f"| {label} | {len(v)} | {sum(v) / len(v):.3f} | {p} |")
    return "\n".join(lines)


@click.command("recall")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="named model, local directory or Hub id")
@click.option("--methods", default="snapkv", show_default=True, help="comma-separated, options as name:key=value")
@click.option("--budgets", default="32,64,128,256", show_default=True, help="comma-separated KV budgets (tokens)")
@click.option("--samples", default=40, show_default=True, help="held-out prompts (test split)")
@click.option("--min-tokens", default=1000, show_default=True, help="shortest context")
@click.option("--max-tokens", default=2000, show_default=True, help="longest context")
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--response-tokens", default=96, show_default=True,
              help="cap of the full-cache answer whose attention is the truth")
@click.option("--answer-tokens", default=0, show_default=True, help="also decode answers and score F1 (0: off)")
@click.option("--threads", default=0, show_default=True, help="torch CPU threads (0: torch default)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for rows.jsonl, args.json and summary.md")
@click.option("--baselines", default="", help="comma-separated labels to pair every method against")
@click.option("--summarize", is_flag=True, help="only rewrite summary.md from the rows in --out (a stopped run's)")
@click.pass_context
def recall_command(ctx, model, methods, budgets, samples, min_tokens, max_tokens, families, seed, response_tokens,
                   answer_tokens, threads, device, out, baselines, summarize):
    """Importance recall: the share of the true top-B prompt positions (by the model's own answer) each method
    keeps, on held-out test-split prompts; rows, args and a summary go to --out."""

    if summarize:
        rows_path = out / "rows.jsonl"
        if not rows_path.exists():
            raise LookaheadKVError(f"{rows_path} does not exist; run without --summarize first")
        rows = complete_samples([json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines()
                                 if line.strip()])
        _report(rows, out, baselines, f"{rows_path}: {sum(r['kind'] == 'sample' for r in rows)} complete samples")
        return
    try:
        budget_list = [int(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise LookaheadKVError(f"--budgets must be comma-separated integers, got {budgets!r}") from None
    if not budget_list or min(budget_list) < 1 or samples < 1 or response_tokens < 1:
        raise LookaheadKVError("--budgets must be positive token counts, and --samples and --response-tokens >= 1")
    chosen = parse_methods(methods)
    family_list = [f for f in families.split(",") if f]
    check_sample_options(family_list, min_tokens, max_tokens)
    if threads > 0:
        torch.set_num_threads(threads)
    m, tok = load_model(model, device=device)
    heldout = heldout_samples(tok, samples, min_tokens, max_tokens, family_list, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").unlink(missing_ok=True)
    (out / "args.json").write_text(json.dumps({**ctx.params, "out": str(out)}, indent=1), encoding="utf-8")
    rows = run_recall(m, tok, heldout, chosen, budget_list, response_tokens, answer_tokens, out / "rows.jsonl")
    header = (f"model {model}; {samples} held-out samples ({families}), context {min_tokens}-{max_tokens} "
              f"tokens, seed {seed}; response cap {response_tokens} tokens")
    _report(rows, out, baselines, header)


def _report(rows: list[dict], out: Path, baselines: str, header: str) -> None:
    report = [header, "", summarize(rows), ""]
    for base in filter(None, baselines.split(",")):
        report += [paired_summary(rows, base), ""]
    if any("f1" in r for r in rows):
        report += [summarize(rows, "f1"), ""]
    report += [timing_summary(rows), ""]
    text = "\n".join(report)
    (out / "summary.md").write_text(text, encoding="utf-8")
    click.echo(text)


