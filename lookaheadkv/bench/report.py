"""Targets of issue 6 checked against a results dict, and the results as markdown tables."""

from __future__ import annotations

TARGET_CONTEXT = 32768


def _name(label: str) -> str:
    return label.split(":")[0]


def _where(row: dict) -> str:
    """The stages of one TTFT row in ms, largest first (the prefill itself left out)."""
    st = {k: v for k, v in row["stages_s"].items() if k != "prefill"}
    return ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(st.items(), key=lambda kv: -kv[1]))


def check_targets(result: dict) -> list[dict]:
    """Issue 6's targets at 32K (or the largest context timed, marked as such). Overheads are judged on the
    directly timed stages (TTFT repeats differ by ~2% at 32K); the paired TTFT difference is given beside."""
    ttft = result["ttft"]
    if not ttft:
        return []
    contexts = sorted({r["context"] for r in ttft})
    ctx = TARGET_CONTEXT if TARGET_CONTEXT in contexts else contexts[-1]
    at = {r["method"]: r for r in ttft if r["context"] == ctx}
    out = []

    def add(target, value, limit, met, row=None, **extra):
        item = {"target": target, "context": ctx, "value": value, "limit": limit, "met": bool(met),
                "exact_context": ctx == TARGET_CONTEXT, **extra}
        if not met and value is not None and limit:
            item["missed_by"] = value - limit if "<=" in target else limit - value
        if row is not None:
            item["where_the_time_goes"] = _where(row)
            item["overhead_ttft_paired"] = row["overhead"]
        out.append(item)

    for label, row in at.items():
        if _name(label) in ("snapkv", "pyramidkv", "lookahead") and "/rows-only" not in label:
            add(f"{label} overhead <= 1% of full TTFT", row["overhead_stages"], 0.01, row["overhead_stages"] <= 0.01,
                row)
    laq = next((r for lbl, r in at.items() if _name(lbl) == "laq"), None)
    for label in ("lookahead", "lookahead/rows-lora"):
        look = at.get(label)
        if look is not None and laq is not None and look["overhead_stages"] > 0:
            ratio = laq["overhead_stages"] / look["overhead_stages"]
            add(f"{laq['method']} overhead / {label} overhead >= 20", ratio, 20.0, ratio >= 20, None,
                laq_where=_where(laq), lookahead_where=_where(look))
    for label, row in at.items():
        if row["budget"] < row["context"] and "/rows-" not in label:
            share = row["kept_tokens"] / row["context"]
            got = row["kv_bytes_kept"] / row["kv_bytes_full"]
            add(f"{label} KV bytes kept = budget's share of the prompt", got, share, abs(got - share) < 1e-9)
    decode = result.get("decode", [])
    if decode:
        batches = sorted({d["batch"] for d in decode})
        for batch in sorted({batches[0], batches[-1]}):
            rows = {d["cache"]: d for d in decode if d["batch"] == batch}
            for label, d in rows.items():
                name, _, budget = label.partition("@")
                plain = rows.get(f"plain@{budget}")
                if not budget or name == "plain" or plain is None or budget != "1024":
                    continue
                rel = d["step_s"] / plain["step_s"] - 1
                add(f"decode step on {label} within 5% of plain@{budget} (batch {batch})", rel, 0.05, rel <= 0.05,
                    None, step_ms=d["step_s"] * 1e3, plain_step_ms=plain["step_s"] * 1e3)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"**{meta['model']}** ({meta['weights']}), {meta['device']}, {meta['config']['dtype']}, torch "
             f"{meta['torch']}, transformers {meta['transformers']}, {meta['date']}.", ""]
    lines += ["| context | method | TTFT (s) | overhead, stages | overhead, paired TTFT | eviction stages |",
              "|---|---|---|---|---|---|"]
    for r in result["ttft"]:
        lines.append(f"| {r['context']} | {r['method']} | {r['ttft_s']:.3f} | {_pct(r['overhead_stages'])} | "
                     f"{_pct(r['overhead'])} | {_where(r) if r['budget'] < r['context'] else ''} |")
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
            shown = f"{v:.1f}x" if "/" in t["target"] else _pct(v)
            lines.append(f"| {t['target']} | {t['context']} | {shown} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def render(json_path: str, out_dir: str | None = None) -> None:
    """Write bench.md and the plots next to (or into out_dir for) a results JSON file."""
    import json
    from pathlib import Path

    from .plots import plot_all

    path = Path(json_path)
    result = json.loads(path.read_text())
    out = Path(out_dir) if out_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(result) + "\n")
    plot_all(result, out)


if __name__ == "__main__":  # python -m lookaheadkv.bench.report RESULTS.json [OUT_DIR]
    import sys

    render(*sys.argv[1:3])
