"""Targets of issues 6 and 12 checked against a results dict, and the results as markdown tables."""

from __future__ import annotations

import math

TARGET_CONTEXT = 32768  # where LAQ's cost is compared with LookaheadKV's
MIN_CONTEXT = 8192  # the TTFT targets hold at every context from here up
ADAPTER_S = 0.003  # the lookahead adapter stage's limit


def _name(label: str) -> str:
    return label.split(":")[0]


def _where(row: dict) -> str:
    """The stages of one TTFT row in ms, largest first (the prefill itself left out)."""
    st = {k: v for k, v in row["stages_s"].items() if k != "prefill"}
    text = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(st.items(), key=lambda kv: -kv[1]))
    if "adapter_paired_s" in row:  # not a stage: the adapter's cost inside the prefill, against the rows-only twin
        text += f" (adapter paired in the prefill {row['adapter_paired_s'] * 1e3:.2f} ms)"
    return text


def _worst(row: dict, suffix: str = "") -> float:
    """The larger of a row's two overheads (paired TTFT, timed stages): a target is met only when both are."""
    return max(row[f"overhead{suffix}"], row[f"overhead_stages{suffix}"])


def check_targets(result: dict) -> list[dict]:
    """The targets, each judged on the larger of the paired TTFT overhead (the definition, median of
    (TTFT_method - TTFT_ref) / TTFT_ref within repeats) and the directly timed stages' sum, at every context
    from 8K up (the largest one when none is that long, marked `exact_context` False): our full cache within
    2% of plain transformers; snapkv, pyramidkv and lookahead within 1% of our full cache; lookahead within
    1% of plain transformers; the adapter stage within 3 ms; with real weights, lookahead at most twice
    snapkv's overhead. At 32K (or the largest context): LAQ's timed stages >= 20x lookahead's, and the KV
    bytes kept. Decode: a step on an evicted 1K cache within 5% of a plain 1K cache's, at every batch. Beside
    each stand the amount missed and where the time goes."""
    ttft = result["ttft"]
    if not ttft:
        return []
    contexts = sorted({r["context"] for r in ttft})
    judged = [c for c in contexts if c >= MIN_CONTEXT] or contexts[-1:]
    ratio_ctx = TARGET_CONTEXT if TARGET_CONTEXT in contexts else contexts[-1]
    timed = not str(result["meta"]["config"]["device"]).startswith("cpu")  # the speed targets are the GPU's
    real = result["meta"].get("weights") == "real weights"
    out = []

    def add(target, ctx, value, limit, met, row=None, exact=None, **extra):
        item = {"target": target, "context": ctx, "value": value, "limit": limit, "met": bool(met),
                "exact_context": ctx >= MIN_CONTEXT if exact is None else exact, **extra}
        if not met and value is not None and limit:
            item["missed_by"] = limit - value if ">=" in target else value - limit  # the rest are upper limits
        if row is not None:
            item.update(where_the_time_goes=_where(row), overhead=row["overhead"],
                        overhead_stages=row["overhead_stages"])
        out.append(item)

    for ctx in judged if timed else []:
        at = {r["method"]: r for r in ttft if r["context"] == ctx}
        full = at.get("full")
        if full is not None and "overhead_plain" in full:
            add("full TTFT within 2% of plain transformers'", ctx, _worst(full, "_plain"), 0.02,
                _worst(full, "_plain") <= 0.02, None, ttft_s=full["ttft_s"], plain_ttft_s=full["ttft_plain_s"],
                paired=full["overhead_plain"], stages=full["overhead_stages_plain"])
        for label, row in at.items():
            if _name(label) not in ("snapkv", "pyramidkv", "lookahead") or "/rows-" in label:
                continue
            add(f"{label} overhead <= 1% of full TTFT", ctx, _worst(row), 0.01, _worst(row) <= 0.01, row)
            if _name(label) == "lookahead" and "overhead_plain" in row:
                add(f"{label} overhead over plain transformers <= 1%", ctx, _worst(row, "_plain"), 0.01,
                    _worst(row, "_plain") <= 0.01, row, paired=row["overhead_plain"],
                    stages=row["overhead_stages_plain"])
            if "adapter" in row["stages_s"]:  # timed alone (an upper bound) and, with the twin, paired in the prefill
                timed, paired = row["stages_s"]["adapter"], row.get("adapter_paired_s")
                adapter = timed if paired is None else max(timed, paired)
                add(f"{label} adapter stage <= 3 ms", ctx, adapter, ADAPTER_S, adapter <= ADAPTER_S, timed=timed,
                    **({} if paired is None else {"paired": paired}))
        snap, look = at.get("snapkv"), at.get("lookahead")
        if real and snap is not None and look is not None:
            ratios = [look[k] / snap[k] if snap[k] > 0 else math.inf for k in ("overhead", "overhead_stages")]
            add("lookahead overhead / snapkv overhead <= 2", ctx, max(ratios), 2.0, max(ratios) <= 2.0, look,
                paired_ratio=ratios[0], stages_ratio=ratios[1], snapkv_where=_where(snap))
    at = {r["method"]: r for r in ttft if r["context"] == ratio_ctx}
    laq = next((r for lbl, r in at.items() if _name(lbl) == "laq"), None)
    look = at.get("lookahead")
    if timed and laq is not None and look is not None:
        floor = look["overhead_stages"]  # both from their timed stages, not from the noise floor
        ratio = laq["overhead_stages"] / floor if floor > 0 else math.inf
        add(f"{laq['method']} overhead / lookahead overhead >= 20 (timed stages)", ratio_ctx, ratio, 20.0,
            ratio >= 20, None, exact=ratio_ctx == TARGET_CONTEXT, laq_overhead_stages=laq["overhead_stages"],
            lookahead_overhead_stages=floor, laq_where=_where(laq), lookahead_where=_where(look))
    for label, row in at.items():
        if row["budget"] < row["context"] and "/rows-" not in label:
            share = row["kept_tokens"] / row.get("bytes_length", row["context"])
            got = row["kv_bytes_kept"] / row["kv_bytes_full"]
            add(f"{label} KV bytes kept = budget's share of the prompt", ratio_ctx, got, share,
                abs(got - share) < 1e-9, exact=ratio_ctx == TARGET_CONTEXT)
    decode = result.get("decode", [])
    if decode and timed:
        for batch in sorted({d["batch"] for d in decode}):
            rows = {d["cache"]: d for d in decode if d["batch"] == batch}
            for label, d in rows.items():
                name, _, budget = label.partition("@")
                plain = rows.get(f"plain@{budget}")
                if not budget or name == "plain" or plain is None or budget != "1024":
                    continue
                rel = d["step_s"] / plain["step_s"] - 1
                add(f"decode step on {label} within 5% of plain@{budget} (batch {batch})", d["context"], rel, 0.05,
                    rel <= 0.05, None, step_ms=d["step_s"] * 1e3, plain_step_ms=plain["step_s"] * 1e3)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"**{meta['model']}** ({meta['weights']}), {meta['device']}, {meta['config']['dtype']}, torch "
             f"{meta['torch']}, transformers {meta['transformers']}, {meta['date']}.", ""]
    lines += ["Overheads against our full cache and against plain transformers (`plain`: its own sdpa attention and "
              "cache, torch's backend choice), each paired within repeats (TTFT) and from the timed stages.", "",
              "| context | method | TTFT (s) | overhead, stages | overhead, paired TTFT | vs plain, stages | "
              "vs plain, paired TTFT | eviction stages |", "|---|---|---|---|---|---|---|---|"]
    for r in result["ttft"]:
        plain = [_pct(r[k]) if k in r else "-" for k in ("overhead_stages_plain", "overhead_plain")]
        lines.append(f"| {r['context']} | {r['method']} | {r['ttft_s']:.3f} | {_pct(r['overhead_stages'])} | "
                     f"{_pct(r['overhead'])} | {plain[0]} | {plain[1]} | "
                     f"{_where(r) if r['budget'] < r['context'] else ''} |")
    if result.get("decode"):
        lines += ["", "| context | batch | cache | kept tokens | step (ms) | tokens/s | KV MiB | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in result["decode"]:
            peak = f"{d['peak_bytes'] / 2**20:.0f}" if d["peak_bytes"] else "-"
            lines.append(f"| {d['context']} | {d['batch']} | {d['cache']} | {d['kept_tokens']:.0f} | "
                         f"{d['step_s'] * 1e3:.2f} | {d['tokens_per_s']:.1f} | {d['kv_bytes'] / 2**20:.1f} | {peak} |")
    cap = result.get("capacity")
    if cap:
        lines += ["", f"Largest batch in {cap['memory_bytes'] / 2**30:.0f} GiB ({cap['memory_source']}), "
                  f"{cap['context']}-token prompt + {cap['new_tokens']} new tokens:", "",
                  "| cache | KV MiB per sequence | largest batch |", "|---|---|---|"]
        for label, c in cap["caches"].items():
            lines.append(f"| {label} | {c['bytes_per_sequence'] / 2**20:.1f} | {c['max_batch']} |")
    if result.get("targets"):
        lines += ["", "| target | context | value | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            v = t["value"]
            shown = f"{v:.1f}x" if " / " in t["target"] else f"{v * 1e3:.2f} ms" if " ms" in t["target"] else _pct(v)
            lines.append(f"| {t['target']} | {t['context']} | {shown} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def capacity_from_ttft(result: dict, memory_bytes: int, new_tokens: int = 512) -> dict:
    """Largest batch per method at the largest context, from the TTFT runs' measured bytes (for a run without
    decode runs): (memory - weights) // per-sequence cache bytes at the end of a `new_tokens` answer."""
    ctx = max(r["context"] for r in result["ttft"])
    rows = [r for r in result["ttft"] if r["context"] == ctx and "/rows-" not in r["method"]]
    per_token = rows[0]["kv_bytes_full"] / ctx
    free = memory_bytes - result["meta"]["weights_bytes"]
    caches = {}
    for r in rows:
        per_seq = r["kv_bytes_kept"] + per_token * new_tokens
        caches[r["method"]] = {"bytes_per_sequence": per_seq, "max_batch": max(0, math.floor(free / per_seq))}
    return {"memory_bytes": memory_bytes, "memory_source": "given; from the TTFT runs' bytes, workspace not counted",
            "weights_bytes": result["meta"]["weights_bytes"], "workspace_bytes": 0, "context": ctx,
            "new_tokens": new_tokens, "kv_bytes_per_token": per_token, "caches": caches}


def summary(result: dict, ignore: tuple[str, ...] = ()) -> str:
    """The README/docs tables: per method at the largest context (overhead and its three largest stages),
    and the paired overhead of each method at every context."""
    ttft = result["ttft"]
    ctx = max(r["context"] for r in ttft)
    lines = [f"| method ({ctx}-token prompt, budget {result['meta']['config']['budget']}) | TTFT (s) | "
             "overhead (paired TTFT) | overhead (timed stages) | vs plain transformers (paired / stages) | "
             "largest eviction stages (ms) |", "|---|---|---|---|---|---|"]
    for r in ttft:
        if r["context"] != ctx:
            continue
        st = {k: v for k, v in r["stages_s"].items() if k != "prefill" and k not in ignore}
        top = sorted(st.items(), key=lambda kv: -kv[1])[:3] if r["budget"] < r["context"] else []
        plain = f"{_pct(r['overhead_plain'])} / {_pct(r['overhead_stages_plain'])}" if "overhead_plain" in r else "-"
        lines.append(f"| {r['method']} | {r['ttft_s']:.3f} | {_pct(r['overhead'])} | {_pct(r['overhead_stages'])} | "
                     f"{plain} | " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in top) + " |")
    fused = [r for r in ttft if r["context"] == ctx and "record_pytorch_s" in r]
    if fused:
        r = fused[0]
        lines += ["", f"Row attention ({r['method']}'s recorded rows, all layers, {ctx} keys): "
                  f"{r['stages_s']['record'] * 1e3:.2f} ms with the fused Triton kernel, "
                  f"{r['record_pytorch_s'] * 1e3:.2f} ms on the PyTorch path."]
    methods = [m for m in dict.fromkeys(r["method"] for r in ttft) if m != "full"]
    lines += ["", "Paired TTFT overhead against our full cache:", "",
              "| context | full TTFT (s) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for c in sorted({r["context"] for r in ttft}):
        at = {r["method"]: r for r in ttft if r["context"] == c}
        lines.append(f"| {c} | {at['full']['ttft_s']:.3f} | "
                     + " | ".join(_pct(at[m]["overhead"]) if m in at else "-" for m in methods) + " |")
    if any("overhead_plain" in r for r in ttft):
        others = [m for m in dict.fromkeys(r["method"] for r in ttft) if m != "plain"]
        lines += ["", "Paired TTFT overhead against plain transformers (timed stages in brackets):", "",
                  "| context | plain TTFT (s) | " + " | ".join(others) + " |", "|---" * (len(others) + 2) + "|"]
        for c in sorted({r["context"] for r in ttft}):
            at = {r["method"]: r for r in ttft if r["context"] == c and "overhead_plain" in r}
            if "full" not in at:
                continue
            lines.append(f"| {c} | {at['full']['ttft_plain_s']:.3f} | " + " | ".join(
                f"{_pct(at[m]['overhead_plain'])} ({_pct(at[m]['overhead_stages_plain'])})" if m in at else "-"
                for m in others) + " |")
    return "\n".join(lines)


def render(json_path: str, out_dir: str | None = None, ignore: tuple[str, ...] = (),
           memory_gib: float | None = None) -> None:
    """Write bench.md (targets included, computed here if the run stopped before them) and the plots for a
    results JSON file. `ignore`: stages to leave out of the tables and the stage sums (a known-bad timing)."""
    import json
    from pathlib import Path

    from .plots import plot_all

    path = Path(json_path)
    result = json.loads(path.read_text())
    for row in result["ttft"]:
        for stage in ignore:
            if stage in row["stages_s"]:
                bad = row["stages_s"].pop(stage)
                row["overhead_stages"] -= bad / row["ttft_full_s"]
    result["targets"] = check_targets(result)  # derived: always from the rows as rendered
    if not result.get("capacity") and memory_gib:
        result["capacity"] = capacity_from_ttft(result, int(memory_gib * 2**30))
    out = Path(out_dir) if out_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    note = [f"Stages left out as mistimed: {', '.join(ignore)}.", ""] if ignore else []
    part = [f"Partial run: {result['partial']}.", ""] if result.get("partial") else []
    (out / "bench.md").write_text("\n".join(note + part) + markdown(result) + "\n")
    (out / "summary.md").write_text(summary(result, ignore) + "\n")
    plot_all(result, out)


if __name__ == "__main__":  # python -m lookaheadkv.bench.report RESULTS.json [OUT_DIR] [--ignore STAGE,...]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lookaheadkv.bench.report")
    ap.add_argument("json_path")
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--ignore", default="", help="comma-separated stages to leave out")
    ap.add_argument("--memory-gib", type=float, help="size the largest batch from the TTFT runs (no decode runs)")
    a = ap.parse_args()
    render(a.json_path, a.out_dir, tuple(x for x in a.ignore.split(",") if x), a.memory_gib)
