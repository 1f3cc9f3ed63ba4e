"""What limits a lookahead module's importance recall: where its misses sit, how predictable the truth is.

On held-out TEST-split samples (lookaheadkv.recall.heldout_samples), CPU, fp32. Per sample: one prefill,
the model's greedy full-cache response (up to --long-tokens), the true importance
(lookaheadkv.importance.true_importance) of several prefixes of it, and the glimpses of the shipped module,
an untrained module (lookahead.create: LoRA B = 0, random-token embeddings) and SnapKV. Reported:

1. recall (lookaheadkv.importance.recall_per_sequence) per method and budget, per layer and KV head at
   --budget, and the misses by true rank, by position type and by the method's own rank;
2. the target's ceiling: recall of the truth of some response tokens against the truth of others (first half
   -> second half, 256-token cap -> 96), the top-B's mass concentration, and mass-weighted recall;
3. the shipped module under other scoring options (recent window, sinks, pooling, GQA max).

    python scripts/recall_limits.py --samples 30 --out results/lookahead/recall_limits
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from lookaheadkv import lookahead as la
from lookaheadkv import scoring
from lookaheadkv.cache import crop
from lookaheadkv.decode import Sampling, decode
from lookaheadkv.evaluation.metrics import mean_ci
from lookaheadkv.generate import build_prompt, select_kept
from lookaheadkv.importance import recall_per_sequence, true_importance
from lookaheadkv.methods import Method, parse_methods
from lookaheadkv.models import load_model
from lookaheadkv.prefill import Prefill, prefill
from lookaheadkv.recall import eos_ids, heldout_samples

Truth = list[torch.Tensor]  # per layer [1, Hq, L]
OPTIONS = ("lookahead:window=8:keep_window=true,lookahead:window=32:keep_window=true,lookahead:sinks=4,"
           "lookahead:sinks=4:window=8:keep_window=true,lookahead:pooling=max:kernel=3,"
           "lookahead:pooling=avg:kernel=3,lookahead:gqa=max")
RANK_BUCKETS = ((1, 8), (9, 16), (17, 32), (33, 64))
OWN_RANK_BUCKETS = ((65, 128), (129, 256), (257, 512), (513, 1 << 30))
TYPES = ("sinks (first 4)", "template head", "answer span", "other context", "instruction + question",
         "template tail")
# predictor truth -> judged truth: how well the attention of some response tokens predicts that of others
CEILINGS = (("r1", "t96"), ("r4", "t96"), ("r16", "t96"), ("half1", "t96"), ("half1", "half2"),
            ("t256", "t96"), ("t96", "t256"))


def position_types(tok, prompt: str, context: str, question: str, answers: list[str]) -> torch.Tensor:
    """[L] index into TYPES for each prompt token, from its character offsets."""
    offsets = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    c0 = prompt.find(context.strip())
    c1 = c0 + len(context.strip())
    tail = prompt.rfind(question.strip()) + len(question.strip())
    spans = []
    low = prompt.lower()
    for a in answers:
        a = a.strip().lower()
        if len(a) < 2 or a in ("yes", "no"):
            continue
        at = low.find(a, c0)
        while 0 <= at < c1:
            spans.append((at, at + len(a)))
            at = low.find(a, at + 1)
    out = []
    for i, (s, e) in enumerate(offsets):
        if i < 4:
            out.append(0)
        elif s < c0:
            out.append(1)
        elif s < c1:
            out.append(2 if any(s < b and e > a for a, b in spans) else 3)
        elif s < tail:
            out.append(4)
        else:
            out.append(5)
    return torch.tensor(out)


def kv_view(per_layer: list[torch.Tensor], n_kv: int) -> torch.Tensor:
    """Per layer [1, Hq, L] -> [layers, Hkv, L], query heads averaged onto their KV head (as recall does)."""
    return scoring.reduce_gqa(torch.cat(per_layer).float(), n_kv, "mean")


def kept_of(model, pf: Prefill, m: Method, glimpse: Truth, budget: int) -> list[torch.Tensor | None]:
    """Kept positions per layer as evict() selects them for method m scoring `glimpse`."""
    scores = scoring.score(glimpse, model.config.num_key_value_heads, m.pooling, m.kernel, m.gqa)
    return select_kept(model, pf, m, budget, scores)


def detail(truth_kv: torch.Tensor, kept: list[torch.Tensor | None], budget: int) -> dict[str, torch.Tensor]:
    """Per layer and KV head: the true top-`budget` (indices, values) and which of them `kept` holds."""
    vals, idx = truth_kv.topk(min(budget, truth_kv.shape[-1]), dim=-1)
    mask = torch.zeros_like(truth_kv, dtype=torch.bool)
    for li, k in enumerate(kept):
        if k is None:
            mask[li] = True
        else:
            mask[li].scatter_(-1, k[0], True)
    return {"idx": idx, "vals": vals, "hit": mask.gather(-1, idx), "kept": mask}


def mass_metrics(truth_kv: torch.Tensor, d: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mass recall (share of the true top-B's mass that the kept set holds) and the kept set's mass over the
    oracle top-B's mass (counts the near-tie substitutes that count recall calls misses)."""
    top_mass = d["vals"].sum(-1)
    return {"mass_recall": float(((d["vals"] * d["hit"]).sum(-1) / top_mass).mean()),
            "kept_mass_ratio": float(((truth_kv * d["kept"]).sum(-1) / top_mass).mean())}


def concentration(truth_kv: torch.Tensor, budget: int) -> dict[str, float]:
    """How peaked the truth is: the top-B's share of the prompt mass, per rank bucket, and how close its tail
    sits to the cut (near ties make the last ranks' membership noise)."""
    total = truth_kv.sum(-1)
    vals = truth_kv.topk(min(budget + 1, truth_kv.shape[-1]), dim=-1).values
    cut = vals[..., budget].clamp_min(1e-12)
    out = {f"top{budget}_mass_share": float((vals[..., :budget].sum(-1) / total).mean())}
    for lo, hi in RANK_BUCKETS:
        out[f"mass_share_rank_{lo}-{hi}"] = float((vals[..., lo - 1:hi].sum(-1) / total).mean())
    out["v64_over_v1"] = float((vals[..., budget - 1] / vals[..., 0]).mean())
    out["v32_over_v1"] = float((vals[..., budget // 2 - 1] / vals[..., 0]).mean())
    out["top_within_1.25x_of_cut"] = float((vals[..., :budget] <= 1.25 * cut[..., None]).float().mean())
    out["top_within_1.5x_of_cut"] = float((vals[..., :budget] <= 1.5 * cut[..., None]).float().mean())
    return out


def miss_stats(d: dict[str, torch.Tensor], types: torch.Tensor, own_scores: torch.Tensor, length: int) -> dict:
    """Counts for one method: misses by true rank, true-top / misses / false keeps by position type and
    last-32 flag, and the misses' rank under the method's own scores."""
    hit, idx = d["hit"], d["idx"]
    miss = ~hit
    out: dict[str, float] = {}
    for lo, hi in RANK_BUCKETS:
        out[f"rank_{lo}-{hi}:top"] = float(hit[..., lo - 1:hi].numel())
        out[f"rank_{lo}-{hi}:miss"] = float(miss[..., lo - 1:hi].sum())
    t_of = types[idx]
    false_keep = d["kept"].clone()
    false_keep.scatter_(-1, idx, False)
    for ti, name in enumerate(TYPES):
        out[f"{name}:top"] = float((t_of == ti).sum())
        out[f"{name}:miss"] = float(((t_of == ti) & miss).sum())
        out[f"{name}:false_keep"] = float(false_keep[..., types == ti].sum())
    recent = idx >= length - 32
    out["last 32:top"], out["last 32:miss"] = float(recent.sum()), float((recent & miss).sum())
    out["last 32:false_keep"] = float(false_keep[..., length - 32:].sum())
    own_rank = own_scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1).gather(-1, idx) + 1
    for lo, hi in OWN_RANK_BUCKETS:
        out[f"own_rank_{lo}-{min(hi, 99999)}:miss"] = float((miss & (own_rank >= lo) & (own_rank <= hi)).sum())
    return out


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device="cpu", dtype=torch.float32)
    mod = la.use_module(model, a.module)
    model0, _ = load_model(a.model, device="cpu", dtype=torch.float32)
    mod0 = la.create(model0, n=mod.n, rank=mod.rank, alpha=mod.alpha, targets=mod.targets)
    n_kv = model.config.num_key_value_heads
    budgets = [int(b) for b in a.budgets.split(",")]
    methods = {"lookahead": parse_methods("lookahead")["lookahead"], "untrained": parse_methods("lookahead")[
        "lookahead"], "snapkv": parse_methods("snapkv")["snapkv"]}
    methods.update(parse_methods(a.options))
    rec_rows = sorted({r for m in methods.values() for r in m.recorded()})
    eos = eos_ids(model, tok)
    samples = heldout_samples(tok, a.samples, a.min_tokens, a.max_tokens, seed=a.seed)
    rows = []
    for s in tqdm(samples, desc="recall limits", unit="sample"):
        t0 = time.perf_counter()
        prompt = build_prompt(tok, s.context, s.question)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        types = position_types(tok, prompt, s.context, s.question, s.answers)
        pf = prefill(model, ids, record_rows=rec_rows)
        response = decode(model, pf, None, eos, Sampling(a.long_tokens))[0]
        crop(pf.cache, pf.length)
        n96 = min(len(response), a.eval_tokens)
        if n96 < 2:
            rows.append({"sample": s.id, "family": s.family, "response_tokens": len(response), "skipped": True})
            continue
        resp = torch.tensor([response])
        half = (n96 + 1) // 2
        truths = {k: true_importance(model, pf, resp[:, :n]) for k, n in
                  (("r1", 1), ("r4", 4), ("r16", 16), ("half1", half), ("t96", n96), ("t256", len(response)))}
        truths["half2"] = [(t * n96 - h * half) / (n96 - half) for t, h in zip(truths["t96"], truths["half1"])]
        glimpses = {"lookahead": la.lookahead_pass(model, mod, pf).mean(),
                    "untrained": la.lookahead_pass(model0, mod0, pf).mean(),
                    "snapkv": methods["snapkv"].glimpse(model, pf)}
        for label in methods:
            glimpses.setdefault(label, glimpses["lookahead"])
        kv = {k: kv_view(v, n_kv) for k, v in truths.items()}
        row: dict = {"sample": s.id, "family": s.family, "prompt_tokens": pf.length, "response_tokens": len(response),
                     "answer_span_tokens": int((types == 2).sum()), "recall": {}, "recall_vs": {}, "mass": {},
                     "per_layer_head": {}, "misses": {}, "ceiling": {}, "ceiling_mass": {},
                     "concentration": concentration(kv["t96"], a.budget)}
        caches: dict[str, dict] = defaultdict(dict)
        for label, m in methods.items():
            for b in budgets:
                kept = kept_of(model, pf, m, glimpses[label], b)
                row["recall"][f"{label}@{b}"] = float(recall_per_sequence(truths["t96"], kept, b, n_kv, None,
                                                                          caches["t96"]))
                if label in ("lookahead", "untrained", "snapkv"):
                    for judge in ("t256", "half1", "half2"):
                        row["recall_vs"][f"{label}@{b}->{judge}"] = float(recall_per_sequence(
                            truths[judge], kept, b, n_kv, None, caches[judge]))
                if label == "lookahead" and b > a.budget:  # true top-B inside the module's top-b: near misses?
                    row["recall"][f"lookahead top-{b} holds true top-{a.budget}"] = float(
                        recall_per_sequence(truths["t96"], kept, a.budget, n_kv))
                if b != a.budget:
                    continue
                d = detail(kv["t96"], kept, b)
                row["mass"][label] = mass_metrics(kv["t96"], d)
                row["per_layer_head"][label] = d["hit"].float().mean(-1).tolist()
                if label in ("lookahead", "untrained", "snapkv"):
                    own = torch.cat(scoring.score(glimpses[label], n_kv, m.pooling, m.kernel, m.gqa))
                    row["misses"][label] = miss_stats(d, types, own, pf.length)
        for src, dst in CEILINGS:
            name = f"{src}->{dst}"
            for b in budgets:
                kept = scoring.select(list(kv[src][:, None].unbind(0)), [b] * len(kv[src]), pf.valid, None)
                row["ceiling"][f"{name}@{b}"] = float(recall_per_sequence(truths[dst], kept, b, n_kv, None,
                                                                          caches[dst]))
                if b == a.budget:
                    d = detail(kv[dst], kept, b)
                    row["ceiling_mass"][name] = mass_metrics(kv[dst], d)
                    row["per_layer_head"][name] = d["hit"].float().mean(-1).tolist()
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return {"args": vars(a), "rows": rows}


# ---------------------------------------------------------------------------------------------- report


def ci(values: list[float], fmt: str = ".3f") -> str:
    m, h = mean_ci(values)
    return f"{m:{fmt}} ± {h:.3f}" if not math.isnan(h) else f"{m:{fmt}}"


def report(res: dict, command: str, out: Path) -> str:
    a = res["args"]
    rows = [r for r in res["rows"] if not r.get("skipped")]
    b = a["budget"]
    budgets = [int(x) for x in a["budgets"].split(",")]
    labels = [k.rsplit("@", 1)[0] for k in rows[0]["recall"] if k.endswith(f"@{b}")]
    fams = sorted({r["family"] for r in rows})
    lines = ["# What limits the lookahead module's importance recall", "", "```", command, "```", "",
             f"{len(rows)} held-out TEST-split samples scored ({len(res['rows']) - len(rows)} skipped: response "
             f"< 2 tokens) of {a['samples']} (heldout_samples seed {a['seed']}, contexts {a['min_tokens']}-"
             f"{a['max_tokens']} tokens; families {', '.join(fams)}), {a['model']}, CPU fp32, "
             f"{sum(r['seconds'] for r in rows):.0f} s. Truth `t96`: mean attention of the model's own greedy "
             f"full-cache response, first {a['eval_tokens']} tokens (as in summary_bf16.md); `t256`: up to "
             f"{a['long_tokens']} tokens (the training targets' cap). Mean ± 95% CI over samples.", "",
             "## 1. Recall by method and budget (count recall against t96)", "",
             "| method | " + " | ".join(f"B={x}" for x in budgets) + f" | mass recall@{b} | kept mass / oracle@{b} "
             "|", "|---|" + "---|" * (len(budgets) + 2)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(ci([r["recall"][f"{lab}@{x}"] for r in rows]) for x in budgets)
                     + f" | {ci([r['mass'][lab]['mass_recall'] for r in rows])} | "
                     f"{ci([r['mass'][lab]['kept_mass_ratio'] for r in rows])} |")
    lens = sorted(r["response_tokens"] for r in rows)
    lines += ["", f"Response lengths (greedy, cap {a['long_tokens']}): median {lens[len(lens) // 2]}, min {lens[0]}, "
              f"max {lens[-1]}; {sum(x > a['eval_tokens'] for x in lens)} of {len(lens)} longer than "
              f"{a['eval_tokens']} (only those have t256 ≠ t96).", "",
              f"The same kept sets judged by other truths (recall@{b}): t256 (the training cap), half1 / half2 (the "
              "first / second half of the ≤96-token response; compare with §4's half1 → half2):", "",
              "| method | vs t96 | vs t256 | vs half1 | vs half2 |", "|---|---|---|---|---|"]
    for lab in ("lookahead", "untrained", "snapkv"):
        lines.append(f"| {lab} | {ci([r['recall'][f'{lab}@{b}'] for r in rows])} | " + " | ".join(
            ci([r["recall_vs"][f"{lab}@{b}->{j}"] for r in rows]) for j in ("t256", "half1", "half2")) + " |")
    lines += ["", "Paired against `lookahead` (same samples), at B=" + str(b) + ":", "",
              "| method | recall − lookahead |", "|---|---|"]
    for lab in labels:
        if lab != "lookahead":
            diff = [r["recall"][f"{lab}@{b}"] - r["recall"][f"lookahead@{b}"] for r in rows]
            lines.append(f"| {lab} | {ci(diff, '+.3f')} |")
    near = [k for k in rows[0]["recall"] if " holds " in k]
    lines += ["", "Near misses: share of the true top-" + str(b) + " inside the module's own top-k: "
              + ", ".join(f"k={k.split()[1].split('-')[1]}: {ci([r['recall'][k] for r in rows])}" for k in near)
              + ".", "", f"Per family, recall@{b}: " + "; ".join(
                  f"{f} (n={sum(r['family'] == f for r in rows)}): lookahead "
                  f"{ci([r['recall'][f'lookahead@{b}'] for r in rows if r['family'] == f])}, snapkv "
                  f"{ci([r['recall'][f'snapkv@{b}'] for r in rows if r['family'] == f])}, truth half1→half2 "
                  f"{ci([r['ceiling'][f'half1->half2@{b}'] for r in rows if r['family'] == f])}" for f in fams) + "."]

    def layer_mean(key: str) -> torch.Tensor:  # [layers, Hkv]
        return torch.tensor([r["per_layer_head"][key] for r in rows]).mean(0)

    la_, sn, un, ce = (layer_mean(k) for k in ("lookahead", "snapkv", "untrained", "half1->half2"))
    lines += ["", f"## 2. recall@{b} per layer and KV head (t96)", "",
              "| layer | lookahead | " + " | ".join(f"lookahead h{h}" for h in range(la_.shape[1]))
              + " | untrained | snapkv | truth half1→half2 |", "|---|" + "---|" * (la_.shape[1] + 4)]
    for li in range(la_.shape[0]):
        lines.append(f"| {li} | {la_[li].mean():.3f} | " + " | ".join(f"{v:.3f}" for v in la_[li].tolist())
                     + f" | {un[li].mean():.3f} | {sn[li].mean():.3f} | {ce[li].mean():.3f} |")
    lines += ["", "Per KV head over all layers, lookahead: "
              + ", ".join(f"h{h} {la_[:, h].mean():.3f}" for h in range(la_.shape[1])) + "."]

    def summed(label: str) -> dict[str, float]:
        tot: dict[str, float] = defaultdict(float)
        for r in rows:
            for k, v in r["misses"][label].items():
                tot[k] += v
        return tot

    lines += ["", f"## 3. Where the misses are (B={b}, t96; counts summed over samples, layers and KV heads)", "",
              "By true rank (miss rate = share of that rank bucket not kept; share = of all misses):", "",
              "| true rank | " + " | ".join(f"{m} miss rate | {m} share of misses" for m in ("lookahead", "snapkv"))
              + " |", "|---|---|---|---|---|"]
    tl, ts = summed("lookahead"), summed("snapkv")
    miss_l = sum(tl[f"rank_{lo}-{hi}:miss"] for lo, hi in RANK_BUCKETS)
    miss_s = sum(ts[f"rank_{lo}-{hi}:miss"] for lo, hi in RANK_BUCKETS)
    for lo, hi in RANK_BUCKETS:
        k = f"rank_{lo}-{hi}"
        lines.append(f"| {lo}-{hi} | {tl[k + ':miss'] / tl[k + ':top']:.3f} | {tl[k + ':miss'] / miss_l:.3f} | "
                     f"{ts[k + ':miss'] / ts[k + ':top']:.3f} | {ts[k + ':miss'] / miss_s:.3f} |")
    kept_total = sum(tl[f"{t}:false_keep"] for t in TYPES)
    lines += ["", "By position type (the answer span: occurrences of a reference answer in the context; HotpotQA "
              "yes/no answers have none; `last 32` overlaps the question and template tail):", "",
              "| position type | share of true top | lookahead miss rate | share of misses | share of lookahead's "
              "false keeps | snapkv miss rate |", "|---|---|---|---|---|---|"]
    top_total = sum(tl[f"{t}:top"] for t in TYPES)
    for t in (*TYPES, "last 32"):
        top = tl[f"{t}:top"]
        lines.append(f"| {t} | {top / top_total:.3f} | {tl[t + ':miss'] / max(top, 1):.3f} | "
                     f"{tl[t + ':miss'] / miss_l:.3f} | {tl[t + ':false_keep'] / kept_total:.3f} | "
                     f"{ts[t + ':miss'] / max(ts[t + ':top'], 1):.3f} |")
    lines += ["", "The misses' rank under the method's own scores (share of its misses):", "",
              "| own rank | lookahead | untrained | snapkv |", "|---|---|---|---|"]
    tu = summed("untrained")
    mu = sum(tu[f"rank_{lo}-{hi}:miss"] for lo, hi in RANK_BUCKETS)
    for lo, hi in OWN_RANK_BUCKETS:
        k = f"own_rank_{lo}-{min(hi, 99999)}:miss"
        lines.append(f"| {lo}-{'end' if hi > 99999 else hi} | {tl[k] / miss_l:.3f} | {tu[k] / mu:.3f} | "
                     f"{ts[k] / miss_s:.3f} |")
    lines += ["", "## 4. Ceiling of the target itself: the truth of some response tokens as the predictor", "",
              "r1/r4/r16: the first 1/4/16 response tokens; half1/half2: the first/second half of the (≤96-token) "
              "response. half1→t96 shares rows with its judge (optimistic); half1→half2 does not.", "",
              "| predictor → judged | " + " | ".join(f"B={x}" for x in budgets) + f" | mass recall@{b} | "
              f"kept mass / oracle@{b} |", "|---|" + "---|" * (len(budgets) + 2)]
    for src, dst in CEILINGS:
        n = f"{src}->{dst}"
        lines.append(f"| {src} → {dst} | " + " | ".join(ci([r["ceiling"][f"{n}@{x}"] for r in rows]) for x in budgets)
                     + f" | {ci([r['ceiling_mass'][n]['mass_recall'] for r in rows])} | "
                     f"{ci([r['ceiling_mass'][n]['kept_mass_ratio'] for r in rows])} |")
    lines += ["", f"Concentration of t96 (per layer and KV head, averaged; 'cut' = the value at rank {b + 1}):", "",
              "| statistic | value |", "|---|---|"]
    for k in rows[0]["concentration"]:
        lines.append(f"| {k} | {ci([r['concentration'][k] for r in rows])} |")
    lines += ["", "Plot: recall_limits.png (recall@" + str(b) + " per layer)."]
    _plot(la_, un, sn, ce, b, out / "recall_limits.png")
    return "\n".join(lines) + "\n"


def _plot(lookahead: torch.Tensor, untrained: torch.Tensor, snapkv: torch.Tensor, ceiling: torch.Tensor,
          budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = list(range(lookahead.shape[0]))
    for v, lab, style in ((lookahead, "lookahead (shipped)", "o-"), (snapkv, "snapkv", "s-"),
                          (untrained, "untrained module", "^--"),
                          (ceiling, "truth of the response's half1 → its half2", "k:")):
        ax.plot(x, v.mean(1).tolist(), style, label=lab, markersize=4)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"importance recall@{budget}")
    ax.set_title(f"recall@{budget} per layer (truth: the greedy response, ≤96 tokens)", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--module", default=None, help="module directory (default: the one shipped for the model)")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--min-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=64, help="the budget of the breakdowns")
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--eval-tokens", type=int, default=96, help="response cap of the judged truth (the eval's)")
    ap.add_argument("--long-tokens", type=int, default=256, help="response cap of the long truth (training's)")
    ap.add_argument("--options", default=OPTIONS, help="lookahead scoring variants (method specs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/lookahead/recall_limits"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from --out's JSON")
    a = ap.parse_args()
    if a.report_only:
        res = json.loads((a.out / "recall_limits.json").read_text())
        (a.out / "recall_limits.md").write_text(report(res, res["command"], a.out))
        return
    if str(a.budget) not in a.budgets.split(","):
        ap.error("--budget must be one of --budgets")
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    res = run(a)
    res["command"] = command
    a.out.mkdir(parents=True, exist_ok=True)
    res["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in res["args"].items()}
    (a.out / "recall_limits.json").write_text(json.dumps(res, indent=1))
    text = report(res, command, a.out)
    (a.out / "recall_limits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
