"""The trainer's own benchmark: target collection, training steps, peak memory, and the stored target's form.

    lookaheadkv bench-train --device cuda --samples 2048 --out results/train/smollm2_h200

1. Collection (lookaheadkv.collect) on fresh prompts of the training families: prompts/s, response tokens/s,
   peak memory; beside it, plain `model.generate` (greedy, left-padded batches, dynamic and static cache) on a
   share of the same prompts, which makes the responses alone (no importance), as the reference point: a dynamic
   cache, a static one, and a static one compiled (transformers' own choice for a static cache on a GPU); and
   the straightforward collection (what the trainer did before: padded decode, then a teacher-forced pass per
   prompt) on that share, for a ratio measured within one run.
2. Training steps (train.batch_loss + AdamW) at --batch-size on those targets, each batch assembled beforehand as
   the trainer's prefetch thread does: steps/s, prompts/s, peak memory.
3. The target's form: the loss of one predictor against the fp32 truth and against the truth as stored (fp16,
   bf16) or cut to its top-k entries per head (the rest spread evenly), over the same prompts.
4. With --profile: torch.profiler over the largest collection batch the collector plans and a few training
   steps, the top operators by self time (the device's where there is one) in profile_collect.txt and
   profile_train.txt, each headed by its wall time and the share of it the device was busy: where the time goes
   (a full batch takes the profiler minutes to tabulate on the H200).
Writes bench_train.json and bench_train.md to --out and prints the tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from .. import lookahead as la
from ..collect import collect_batch, eos_ids, plan_batches, tokens_that_fit
from ..errors import LookaheadKVError
from ..train import Batch, batch_loss, hardware, kl_loss, left_pad
from ..train_data import FAMILIES, load_prompts, training_prompts
from .timing import Clock


def _prompts(tok, samples: int, min_tokens: int, max_tokens: int, seed: int) -> list[torch.Tensor]:
    ps = training_prompts(tok, samples, min_tokens, max_tokens, FAMILIES, seed)
    return [torch.tensor(x) for x in tok([p.text(tok) for p in ps], add_special_tokens=False)["input_ids"]]


def bench_collect(model, tok, ids: list[torch.Tensor], cap: int, batch_tokens: int | None) -> tuple[dict, list]:
    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    budget = batch_tokens or tokens_that_fit(model, cap)
    groups = plan_batches([len(x) for x in ids], cap, budget)
    collect_batch(model, [ids[i] for i in groups[0][:4]], 8, eos)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device)
    targets = []
    for g in groups:
        targets += [t for t in collect_batch(model, [ids[i] for i in g], cap, eos) if t is not None]
    s = clock.lap()
    resp = sum(len(t.response) for t in targets)
    out = {"prompts": len(ids), "answered": len(targets), "batches": len(groups), "batch_tokens": budget,
           "seconds": s, "prompts_per_s": len(ids) / s, "response_tokens_per_s": resp / s,
           "response_tokens_mean": resp / max(1, len(targets)), "response_cap": cap,
           "prompt_tokens_mean": sum(map(len, ids)) / len(ids)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out, targets


def bench_reference(model, tok, ids: list[torch.Tensor], cap: int, batch: int) -> dict:
    """The straightforward collection on the same prompts (what the trainer did before lookaheadkv.collect):
    one padded prefill and greedy decode per batch (every row to the longest answer, a mask per layer and a
    host sync per step), then one teacher-forced pass of each answer after its own cached prompt."""
    from transformers import DynamicCache

    from ..cache import crop
    from ..decode import Sampling, decode
    from ..importance import true_importance
    from ..prefill import Prefill, prefill

    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    clock = Clock(device)
    answered, resp_tokens = 0, 0
    for k in range(0, len(order), batch):
        group = [ids[i] for i in order[k:k + batch]]
        x, m = left_pad(group)
        pf = prefill(model, x.to(device), m.to(device))
        responses = decode(model, pf, pf.key_valid(model.config.num_hidden_layers), eos, Sampling(cap))
        crop(pf.cache, pf.length)
        for i, r in enumerate(responses):
            if not r:
                continue
            start = pf.length - len(group[i])  # the sequence's own rows of the batch cache, without its pads
            one = DynamicCache(config=model.config)
            for layer_idx, layer in enumerate(pf.cache.layers):
                one.update(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:], layer_idx)
            alone = x[i:i + 1, start:].to(device)
            single = Prefill(one, alone, torch.ones_like(alone, dtype=torch.bool), pf.next_logits[i:i + 1], {})
            true_importance(model, single, torch.tensor([r], device=device))
            answered, resp_tokens = answered + 1, resp_tokens + len(r)
        del pf
    s = clock.lap()
    return {"prompts": len(ids), "batch": batch, "answered": answered, "seconds": s, "prompts_per_s": len(ids) / s,
            "response_tokens_per_s": resp_tokens / s}


GENERATE_VARIANTS = {"dynamic": {}, "static": {"cache_implementation": "static", "disable_compile": True},
                     "static+compile": {"cache_implementation": "static"}}  # transformers compiles a static cache


def bench_generate(model, tok, ids: list[torch.Tensor], cap: int, batch: int, variant: str) -> dict:
    """Plain transformers greedy generation of the same prompts (responses only), batches of `batch`; the
    warm-up (and a compilation) is left out of the time. A variant that fails is reported, not raised."""
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    kw = dict(max_new_tokens=cap, do_sample=False, pad_token_id=tok.pad_token_id, **GENERATE_VARIANTS[variant])
    out = {"prompts": len(ids), "batch": batch, "variant": variant}
    try:
        clock = Clock(device)
        x, m = left_pad([ids[i] for i in order[:batch]], tok.pad_token_id)
        model.generate(input_ids=x.to(device), attention_mask=m.long().to(device), **{**kw, "max_new_tokens": 8})
        out["warmup_seconds"] = clock.lap()
        new = 0
        for k in range(0, len(order), batch):
            x, m = left_pad([ids[i] for i in order[k:k + batch]], tok.pad_token_id)
            got = model.generate(input_ids=x.to(device), attention_mask=m.long().to(device), **kw)
            new += int((got[:, x.shape[1]:] != tok.pad_token_id).sum())
        s = clock.lap()
    except Exception as e:  # e.g. a compiler that cannot trace this model: the other variants still count
        return {**out, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return {**out, "seconds": s, "prompts_per_s": len(ids) / s, "new_tokens_per_s": new / s}


def _length_groups(targets: list, batch: int) -> list[list]:
    """Training batches of neighbours in length (as the trainer's own batches are), whole ones only."""
    order = sorted(range(len(targets)), key=lambda i: len(targets[i].ids))
    groups = [[targets[i] for i in order[k:k + batch]] for k in range(0, len(order) - batch + 1, batch)]
    if not groups:
        raise LookaheadKVError(f"need at least {batch} answered prompts to time training steps")
    return groups


def _training_step(model, mod: la.LookaheadModule):
    """One step as the trainer takes it, on a list of targets: batch_loss, backward, clip, AdamW (fused on CUDA);
    returns the loss."""
    params = mod.parameters(model)
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=1e-3, **fused)

    def step(targets: list) -> torch.Tensor:
        loss, _ = batch_loss(model, mod, targets, grad=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.detach()
    return step


def bench_steps(model, targets: list, batch: int, steps: int, warmup: int = 3) -> tuple[dict, la.LookaheadModule]:
    device = next(model.parameters()).device
    model.requires_grad_(False)
    mod = la.create(model, 32, 8, 32)
    for p in mod.parameters(model):
        p.requires_grad_(True)
    # assembled before the clock, in pinned memory on a GPU: the trainer's prefetch thread does this beside the steps
    groups = [Batch.of(g, pin=device.type == "cuda") for g in _length_groups(targets, batch)]
    step = _training_step(model, mod)
    for k in range(warmup):
        step(groups[k % len(groups)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device)
    tokens = 0
    for k in range(steps):
        g = groups[k % len(groups)]
        step(g)
        tokens += int(g.mask.sum())
    s = clock.lap()
    out = {"batch": batch, "steps": steps, "seconds": s, "steps_per_s": steps / s, "prompts_per_s": steps * batch / s,
           "prompt_tokens_mean": tokens / (steps * batch)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out, mod


def _topk_form(t: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k entries per head kept, the remaining mass spread evenly over the other positions."""
    length = t.shape[-1]
    if k >= length:
        return t
    v, i = t.topk(k, dim=-1)
    rest = (t.sum(-1, keepdim=True) - v.sum(-1, keepdim=True)).clamp_min(0) / (length - k)
    return rest.expand_as(t).clone().scatter_(-1, i, v)


def bench_forms(model, mod, targets: list, n: int = 64, ks=(256, 512, 1024)) -> list[dict]:
    """Loss of one predictor (the module after the timed steps) against each form of the truth."""
    device = next(model.parameters()).device
    rows: dict[str, list[float]] = {}
    from ..prefill import prefill

    for t in targets[:n]:
        with torch.no_grad():
            pf = prefill(model, t.ids[None].to(device))
            pred = la.lookahead_pass(model, mod, pf).mean()
        exact = t.truth.float()[None].to(device)
        forms = {"fp32": exact, "fp16": exact.half().float(), "bf16": exact.bfloat16().float()}
        forms |= {f"top-{k} + even rest": _topk_form(exact, k) for k in ks}
        for name, f in forms.items():
            rows.setdefault(name, []).append(float(kl_loss(pred, f)))
    base = sum(rows["fp32"]) / len(rows["fp32"])
    return [{"form": k, "loss": sum(v) / len(v), "relative_change": sum(v) / len(v) / base - 1}
            for k, v in rows.items()]


def _busy(prof, wall: float, cuda: bool) -> str:
    """The profiled region's wall time and, on a GPU, the share of it its kernels kept the device busy: near 100%
    the loop is bound by the GPU's work, far below by the host issuing it."""
    if not cuda:
        return f"wall {wall:.2f} s"
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return f"wall {wall:.2f} s, device kernels {kernels:.2f} s ({100 * kernels / wall:.0f}% busy)"


def profile_tables(model, mod: la.LookaheadModule, targets: list, ids: list[torch.Tensor], cap: int, batch: int,
                   eos: set[int], budget: int, steps: int = 5, rows: int = 30) -> dict[str, str]:
    """Operator tables (torch.profiler) for one collection batch as the collector plans it at `budget` buffer
    tokens and `steps` training steps, sorted by self time on the device (CUDA) or the CPU, each headed by its
    wall time and how busy it kept the device."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    part = [ids[i] for i in max(plan_batches([len(x) for x in ids], cap, budget), key=len)]
    collect_batch(model, part[:4], 8, eos)  # warm-up
    out = {}
    with profile(activities=activities) as prof:
        clock = Clock(device)
        collect_batch(model, part, cap, eos)
        wall = clock.lap()
    out["collect"] = (f"# collect_batch: {len(part)} prompts (mean {sum(map(len, part)) / len(part):.0f} tokens), "
                      f"cap {cap}; {_busy(prof, wall, cuda)}\n\n"
                      + prof.key_averages().table(sort_by=key, row_limit=rows))
    groups = [Batch.of(g, pin=cuda) for g in _length_groups(targets, batch)]
    step = _training_step(model, mod)  # on the module bench_steps trained
    step(groups[0])  # warm-up: AdamW makes its state
    with profile(activities=activities) as prof:
        clock = Clock(device)
        for k in range(steps):
            step(groups[k % len(groups)])
        wall = clock.lap()
    out["train"] = (f"# {steps} training steps at batch {batch}; {_busy(prof, wall, cuda)}\n\n"
                    + prof.key_averages().table(sort_by=key, row_limit=rows))
    return out


def _g(x: float | None) -> str:
    """3 significant digits (a CPU's 0.0871 prompts/s and a GPU's 187 alike); – where not measured."""
    return "–" if x is None or x != x else f"{x:.3g}"


def markdown(res: dict) -> str:
    c, s = res["collection"], res["training"]
    lines = [f"# Trainer benchmark: {res['model']} on {res['hardware']}", "",
             f"Prompts: {c['prompts']} of the training families, {res['min_tokens']}-{res['max_tokens']} tokens "
             f"(mean {c['prompt_tokens_mean']:.0f}), greedy responses capped at {c['response_cap']} tokens.", "",
             "| collection | prompts/s | response tokens/s | mean response | seconds | peak GiB |",
             "|---|---|---|---|---|---|",
             f"| lookaheadkv.collect (responses + importance) | {_g(c['prompts_per_s'])} | "
             f"{_g(c['response_tokens_per_s'])} | {c['response_tokens_mean']:.1f} | {c['seconds']:.1f} | "
             f"{_g(c.get('peak_gib'))} |"]
    if "reference" in res:
        r = res["reference"]
        lines.append(f"| straightforward (padded decode to the longest answer, then a teacher-forced pass per prompt), "
                     f"batch {r['batch']}, {r['prompts']} prompts | {_g(r['prompts_per_s'])} | "
                     f"{_g(r['response_tokens_per_s'])} | | {r['seconds']:.1f} | |")
        share = c["prompts_per_s"] / r["prompts_per_s"]
        lines.append(f"| ratio, lookaheadkv.collect / straightforward (same run) | {share:.1f}x | | | | |")
    for g in res.get("generate", []):
        what = f"| model.generate, batch {g['batch']}, {g['variant']} cache (responses only, {g['prompts']} prompts)"
        if "error" in g:
            lines.append(f"{what} | failed: {g['error']} | | | | |")
        else:
            lines.append(f"{what} | {_g(g['prompts_per_s'])} | {_g(g['new_tokens_per_s'])} | | {g['seconds']:.1f} "
                         f"(+ {g['warmup_seconds']:.1f} warm-up) | |")
    lines += ["", "| training | steps/s | prompts/s | mean prompt tokens | peak GiB |", "|---|---|---|---|---|",
              f"| batch {s['batch']}, {s['steps']} steps | {_g(s['steps_per_s'])} | {_g(s['prompts_per_s'])} | "
              f"{s['prompt_tokens_mean']:.0f} | {_g(s.get('peak_gib'))} |", "",
              "| target form | loss (KL) | change vs fp32 |", "|---|---|---|"]
    lines += [f"| {f['form']} | {f['loss']:.5f} | {f['relative_change']:+.2%} |" for f in res["forms"]]
    return "\n".join(lines)


@click.command("bench-train")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--samples", default=256, show_default=True, help="prompts to collect targets for")
@click.option("--min-tokens", default=1000, show_default=True)
@click.option("--max-tokens", default=3000, show_default=True)
@click.option("--response-tokens", default=256, show_default=True)
@click.option("--batch-tokens", type=int, help="collection buffer tokens per batch (default: from free memory)")
@click.option("--batch-size", default=16, show_default=True, help="training batch")
@click.option("--steps", default=30, show_default=True, help="timed training steps")
@click.option("--generate-batches", default="", help="batch sizes for the model.generate reference ('' : none)")
@click.option("--generate-share", default=0.25, show_default=True,
              help="share of the prompts the references (model.generate, the straightforward collection) run on")
@click.option("--reference-batch", default=64, show_default=True,
              help="batch of the straightforward collection on that share (0: skip it)")
@click.option("--seed", default=1, show_default=True, help="prompt seed (the training prompts use 0)")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, exists=True),
              help="take the prompts from this file (`lookaheadkv prompts`) instead of building them")
@click.option("--profile", is_flag=True, help="also write operator tables (torch.profiler): where the time goes")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
def bench_train(model_name, device, samples, min_tokens, max_tokens, response_tokens, batch_tokens, batch_size, steps,
                generate_batches, generate_share, reference_batch, seed, prompts_file, profile, out):
    """Collection and training throughput of the lookahead trainer, and the stored target's form."""
    from ..models import load_model

    if samples < batch_size:
        raise LookaheadKVError(f"--samples ({samples}) must be at least --batch-size ({batch_size})")
    model, tok = load_model(model_name, device=device)
    if prompts_file:
        ids, _, opts = load_prompts(prompts_file)
        ids, min_tokens, max_tokens = ids[:samples], opts["min_tokens"], opts["max_tokens"]
    else:
        ids = _prompts(tok, samples, min_tokens, max_tokens, seed)
    res = {"model": model_name, "hardware": hardware(next(model.parameters()).device),
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "min_tokens": min_tokens,
           "max_tokens": max_tokens, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["collection"], targets = bench_collect(model, tok, ids, response_tokens, batch_tokens)
    click.echo(json.dumps(res["collection"]), err=True)
    res["generate"] = []
    share = ids[: max(1, int(len(ids) * generate_share))]
    if reference_batch:
        res["reference"] = bench_reference(model, tok, share, response_tokens, reference_batch)
        click.echo(json.dumps(res["reference"]), err=True)
    for b in [int(x) for x in generate_batches.split(",") if x.strip()]:
        for variant in GENERATE_VARIANTS:
            res["generate"].append(bench_generate(model, tok, share, response_tokens, b, variant))
            click.echo(json.dumps(res["generate"][-1]), err=True)
    res["training"], mod = bench_steps(model, targets, batch_size, steps)
    res["forms"] = bench_forms(model, mod, targets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (out / "bench_train.md").write_text(text + "\n")
    click.echo(text)
    if profile:
        tables = profile_tables(model, mod, targets, ids, response_tokens, batch_size, eos_ids(model, tok),
                              res["collection"]["batch_tokens"])
        for name, table in tables.items():
            (out / f"profile_{name}.txt").write_text(table + "\n")
            click.echo(table.splitlines()[0])
