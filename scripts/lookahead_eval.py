"""Held-out evaluation of a lookahead module against the baselines, batched for the GPU.

1. Defaults: on the trainer's validation prompts (its content-hash share of the TRAIN-split prompts, with
   their stored targets), importance recall of the lookahead scores under several pooling / window settings; the best
   (mean over budgets) is used below and written to grid.md.
2. Test: on held-out TEST-split samples (lookaheadkv.recall.heldout_samples: SQuAD + distractors, HotpotQA,
   essays with a planted code), importance recall at each budget for every method (the model's own greedy
   full-cache response gives the truth), and for the F1 methods and budgets the answer decoded from the
   evicted cache, scored by token F1 against the full-cache answer of the same length.

It is the batched twin of lookaheadkv.recall.run_recall (one left-padded prefill per batch serves every
method; recall needs only the kept indices, so only the F1 runs compact and decode a cache clone).

    python scripts/lookahead_eval.py --module lookaheadkv/modules/smollm2-135m-instruct --out results/lookahead
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from lookaheadkv import lookahead as la
from lookaheadkv import scoring
from lookaheadkv import train as tr
from lookaheadkv.collect import collect_batch, eos_ids, prompt_key
from lookaheadkv.decode import Sampling, decode
from lookaheadkv.evaluation.metrics import mean_ci, token_f1
from lookaheadkv.generate import build_prompt, evict, select_kept
from lookaheadkv.importance import recall_per_sequence
from lookaheadkv.methods import get_method
from lookaheadkv.models import load_model
from lookaheadkv.prefill import prefill
from lookaheadkv.recall import Sample, heldout_samples
from lookaheadkv.targets import TargetStore
from lookaheadkv.train_data import load_prompts

GRID = [dict(pooling=p, kernel=k, window=w, keep_window=w > 0)
        for p, k in (("none", 1), ("max", 5), ("max", 7), ("avg", 5), ("avg", 7)) for w in (0, 8, 32)]


def kept_for(model, pf, m, glimpse, budget):
    """Kept indices per layer for method m (scores from `glimpse` when given), as evict() would select."""
    valid = pf.valid if pf.padded else None
    scores = (scoring.score(glimpse, model.config.num_key_value_heads, m.pooling, m.kernel, m.gqa, valid)
              if glimpse is not None else m.scores(model, pf))
    return select_kept(model, pf, m, budget, scores)


def recall_rows(model, pf, truth, kept, budget):
    """Per-sample importance recall (lookaheadkv.importance.recall_per_sequence on the batch)."""
    return recall_per_sequence(list(truth.unbind(1)), kept, budget, model.config.num_key_value_heads,
                               pf.valid).tolist()


def batches(lengths, size):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k:k + size] for k in range(0, len(order), size)]


def grid(model, mod, targets, budgets, batch_size, device):
    sums = defaultdict(lambda: defaultdict(list))
    items = [t for t in targets if t is not None]
    for group in tqdm(batches([len(t.ids) for t in items], batch_size), desc="grid", unit="batch"):
        ts = [items[i] for i in group]
        batch = tr.Batch.of(ts)
        pf = prefill(model, batch.ids.to(device), batch.mask.to(device))
        glimpse = la.lookahead_pass(model, mod, pf).mean()
        truth = batch.truth.to(device).float()
        for g in GRID:
            m = get_method("lookahead", **g)
            for b in budgets:
                sums[json.dumps(g)][b] += recall_rows(model, pf, truth, kept_for(model, pf, m, glimpse, b), b)
    table = {k: {b: sum(v) / len(v) for b, v in per.items()} for k, per in sums.items()}
    best = max(table, key=lambda k: sum(table[k].values()))
    lines = [f"lookahead scoring options: importance recall on {len(items)} validation prompts (train split, "
             "held out from training)", "", "| options | " + " | ".join(f"B={b}" for b in budgets) + " | mean |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for k, per in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        mark = " **(chosen)**" if k == best else ""
        lines.append(f"| {k}{mark} | " + " | ".join(f"{per[b]:.3f}" for b in budgets)
                     + f" | {sum(per.values()) / len(per):.3f} |")
    return json.loads(best), "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--module", help="module directory (default: the one shipped for the model)")
    ap.add_argument("--targets", help="the trainer's target store, for the options grid (omit: module defaults)")
    ap.add_argument("--prompts", help="the trainer's prompt file (its validation share is the grid's prompts)")
    ap.add_argument("--target-tokens", type=int, default=512, help="the store's response cap")
    ap.add_argument("--val-share", type=float, default=0.05)
    ap.add_argument("--val-max", type=int, default=256)
    ap.add_argument("--samples-file", help="held-out samples (JSON); made and written there when it is missing")
    ap.add_argument("--only-samples", action="store_true", help="write --samples-file and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--min-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--methods", default="lookahead,snapkv,pyramidkv,h2o,streamingllm")
    ap.add_argument("--f1-methods", default="lookahead,snapkv")
    ap.add_argument("--f1-budgets", default="64,128")
    ap.add_argument("--response-tokens", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="output folder (required unless --only-samples)")
    a = ap.parse_args()
    if not a.out and not a.only_samples or a.only_samples and not a.samples_file:
        ap.error("give --out (or --only-samples with --samples-file)")
    if a.only_samples:
        from transformers import AutoTokenizer

        from lookaheadkv.models import resolve

        tok = AutoTokenizer.from_pretrained(resolve(a.model))
        samples = heldout_samples(tok, a.samples, a.min_tokens, a.max_tokens, seed=a.seed)
        Path(a.samples_file).write_text(json.dumps([asdict(x) for x in samples]))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load_model(a.model, device=a.device)
    if a.samples_file and Path(a.samples_file).exists():
        samples = [Sample(**x) for x in json.loads(Path(a.samples_file).read_text())]
    else:
        samples = heldout_samples(tok, a.samples, a.min_tokens, a.max_tokens, seed=a.seed)
        if a.samples_file:
            Path(a.samples_file).write_text(json.dumps([asdict(x) for x in samples]))
    mod = la.use_module(model, a.module)
    budgets = [int(b) for b in a.budgets.split(",")]
    device = next(model.parameters()).device

    chosen = {k: getattr(get_method("lookahead"), k) for k in ("pooling", "kernel", "window", "keep_window")}
    if a.targets:
        store = TargetStore(a.targets, la.model_identity(model), a.target_tokens)
        keys = [prompt_key(x) for x in load_prompts(a.prompts)[0]]
        val = [k for k in dict.fromkeys(keys) if tr.is_validation(k, a.val_share) and k in store][: a.val_max]
        chosen, text = grid(model, mod, [store.get(k) for k in val], budgets, a.batch_size, device)
        (out / "grid.md").write_text(text + "\n")
        print(text)
    methods = {name: get_method(name, **(chosen if name == "lookahead" else {})) for name in a.methods.split(",")}
    f1_methods, f1_budgets = a.f1_methods.split(","), [int(b) for b in a.f1_budgets.split(",")]

    ids = [tok(build_prompt(tok, s.context, s.question), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
           for s in samples]
    eos = eos_ids(model, tok)
    rows = []
    rec_rows = sorted({r for m in methods.values() for r in m.recorded()})
    for group in tqdm(batches([len(x) for x in ids], a.batch_size), desc="test", unit="batch"):
        targets = collect_batch(model, [ids[i] for i in group], a.response_tokens, eos)
        keep = [(i, t) for i, t in zip(group, targets) if t is not None]
        for i, t in zip(group, targets):
            if t is None:
                rows.append({"sample": f"{i}:{samples[i].id}", "family": samples[i].family, "no_response": True})
        if not keep:
            continue
        group, ts = [i for i, _ in keep], [t for _, t in keep]
        batch = tr.Batch.of(ts)  # the targets' ids are these prompts
        pf = prefill(model, batch.ids.to(device), batch.mask.to(device), record_rows=rec_rows)
        glimpse = la.lookahead_pass(model, mod, pf).mean() if "lookahead" in methods else None
        truth = batch.truth.to(device).float()
        refs = [tok.decode(t.response[:a.answer_tokens], skip_special_tokens=True).strip() for t in ts]
        for name, m in methods.items():
            for b in budgets:
                kept = kept_for(model, pf, m, glimpse if name == "lookahead" else None, b)
                rec = recall_rows(model, pf, truth, kept, b)
                f1 = [None] * len(group)
                answers = [None] * len(group)
                if name in f1_methods and b in f1_budgets:
                    c = pf.clone()
                    ev = evict(model, c, m, b)
                    got = decode(model, c, ev.key_valid, eos, Sampling(a.answer_tokens))
                    answers = [tok.decode(x, skip_special_tokens=True).strip() for x in got]
                    f1 = [token_f1(x, r) for x, r in zip(answers, refs)]
                    del c
                for k, i in enumerate(group):
                    rows.append({"sample": f"{i}:{samples[i].id}", "family": samples[i].family, "method": name,
                                 "budget": b,
                                 "prompt_tokens": len(ids[i]), "response_tokens": len(ts[k].response),
                                 "recall": rec[k], "f1": f1[k], "answer": answers[k], "reference": refs[k]})
    with open(out / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    report = summary(rows, methods, budgets, f1_methods, f1_budgets, a, chosen, time.perf_counter() - t_start,
                     tr.hardware(device))
    (out / "summary.md").write_text(report + "\n")
    print(report)


def paired(rows, a_name, b_name, budget, metric):
    """Mean and 95% CI of the per-sample difference a - b."""
    by = defaultdict(dict)
    for r in rows:
        if r.get("budget") == budget and r.get(metric) is not None:
            by[r["sample"]][r["method"]] = r[metric]
    diffs = [v[a_name] - v[b_name] for v in by.values() if a_name in v and b_name in v]
    return mean_ci(diffs), len(diffs)


def summary(rows, methods, budgets, f1_methods, f1_budgets, a, chosen, seconds, hw):
    scored = [r for r in rows if "method" in r]
    n = len({r["sample"] for r in scored})
    lines = [f"# LookaheadKV vs baselines, {a.model}, held-out TEST split", "",
             f"{n} samples scored ({len(rows) - len(scored)} without a response) of {a.samples} "
             f"(lookaheadkv.recall.heldout_samples, seed {a.seed}: SQuAD + distractors, HotpotQA, essays with a "
             f"planted code), contexts {a.min_tokens}-{a.max_tokens} tokens. Truth: the model's own greedy "
             f"full-cache response (up to {a.response_tokens} tokens). lookahead options: {json.dumps(chosen)}. "
             f"Module: {a.module}. {seconds:.0f} s on {hw}.", "",
             "## Importance recall (mean ± 95% CI over samples; layers and KV heads averaged)", "",
             "| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    lines += _table_rows(scored, methods, budgets, "recall")
    families = sorted({r["family"] for r in scored})
    lines += ["", "Per family (mean recall):", "", "| method | family | " + " | ".join(f"B={b}" for b in budgets)
              + " |", "|---|---|" + "---|" * len(budgets)]
    for name in methods:
        for fam in families:
            vals = [mean_ci([r["recall"] for r in scored if r["method"] == name and r["budget"] == b
                             and r["family"] == fam])[0] for b in budgets]
            lines.append(f"| {name} | {fam} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", f"## Answer agreement with the full cache (token F1 of the first {a.answer_tokens} answer tokens "
              "against the full-cache answer's)", "", "| method | " + " | ".join(f"B={b}" for b in f1_budgets) + " |",
              "|---|" + "---|" * len(f1_budgets)]
    lines += _table_rows(scored, f1_methods, f1_budgets, "f1")
    return "\n".join(lines)


def _table_rows(scored: list[dict], methods, budgets, metric: str) -> list[str]:
    """One row per method (mean ± 95% CI per budget), then lookahead − snapkv paired when both ran."""
    lines = []
    for name in methods:
        cells = []
        for b in budgets:
            m, ci = mean_ci([r[metric] for r in scored if r["method"] == name and r["budget"] == b])
            cells.append(f"{m:.3f} ± {ci:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "lookahead" in methods and "snapkv" in methods:
        cells = []
        for b in budgets:
            (m, ci), _ = paired(scored, "lookahead", "snapkv", b, metric)
            cells.append(f"{m:+.3f} ± {ci:.3f}")
        lines.append("| lookahead − snapkv (paired) | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
