"""Train a lookahead module for a model: collect targets once, then minimise KL(true || predicted).

Targets: for each training prompt, the model's own greedy response (batched, left-padded) and the true
importance of the prompt per layer and query head (importance.true_importance: the response rows' mean
attention onto the prompt keys, never a prompt x prompt matrix). They are written to disk in shards and
reused by later runs (same model, same prompts).

Loss: both score vectors normalised over the prompt positions (sum 1), KL(true || predicted), averaged over
layers, heads and the batch. Only the n embeddings and the LoRA train. The prompt prefill runs under
no_grad with the LoRA off (no trainable parameter touches a prompt row), so gradients flow only through the
n-row lookahead pass: training costs a prefill plus a 32-row pass, not a backward over the prompt.

    lookaheadkv train --model smollm2-135m-instruct --out my-module --device cuda
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import DynamicCache

from . import lookahead as la
from .cache import crop
from .decode import Sampling, decode
from .errors import LookaheadKVError
from .importance import true_importance
from .prefill import Prefill, prefill
from .train_data import FAMILIES, training_prompts


@dataclass
class Target:
    """One prompt's training target: its token ids, the model's greedy response, and the true importance."""

    ids: torch.Tensor  # [L] long
    response: torch.Tensor  # [R] long
    truth: torch.Tensor  # [layers, Hq, L] fp16


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return (ids | {getattr(tokenizer, "eos_token_id", None)}) - {None}


def left_pad(seqs: Sequence[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and bool mask, left-padded."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = True
    return ids, mask


def _one(pf: Prefill, i: int, model) -> Prefill:
    """Sequence i of a left-padded prefill alone, without its pads (shares the cache tensors' storage)."""
    start = int(pf.length - pf.lengths[i])
    cache = DynamicCache(config=model.config)
    for layer_idx, layer in enumerate(pf.cache.layers):
        cache.update(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:], layer_idx)
    ids = pf.input_ids[i:i + 1, start:]
    return Prefill(cache, ids, torch.ones_like(ids, dtype=torch.bool), pf.next_logits[i:i + 1], {})


@torch.no_grad()
def collect_batch(model, ids: Sequence[torch.Tensor], response_tokens: int, eos: set[int]) -> list[Target | None]:
    """Greedy responses for a batch of prompts (one left-padded prefill and decode) and each one's true
    importance (computed per sequence, so the mean runs over that sequence's response rows only).
    None where the model answers nothing (EOS first)."""
    device = next(model.parameters()).device
    batch, mask = left_pad(ids)
    pf = prefill(model, batch.to(device), mask.to(device))
    responses = decode(model, pf, pf.key_valid(model.config.num_hidden_layers), eos, Sampling(response_tokens))
    crop(pf.cache, pf.length)
    out: list[Target | None] = []
    for i, resp in enumerate(responses):
        if not resp:
            out.append(None)
            continue
        truth = true_importance(model, _one(pf, i, model), torch.tensor([resp], device=device))
        out.append(Target(ids[i].cpu(), torch.tensor(resp), torch.stack([t[0] for t in truth]).half().cpu()))
    return out


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length (little padding), at most batch_size and ~max_tokens per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * lengths[i] > max_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def collect_targets(model, tokenizer, prompt_ids: Sequence[torch.Tensor], targets_dir: str | Path,
                    response_tokens: int = 256, batch_size: int = 64, max_batch_tokens: int = 200_000,
                    progress: bool = True, time_limit_s: float | None = None) -> list[Target | None]:
    """Targets for every prompt, stored as shards under targets_dir and reused when they are already there
    (a manifest ties them to the model and the prompts; anything else there is refused). Batches run in a
    seeded random order, so a time limit drops a random subset of prompts (their targets stay None)."""
    d = Path(targets_dir)
    d.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for ids in prompt_ids:
        digest.update(ids.numpy().astype("int64").tobytes())
    manifest = {"model": la.model_identity(model), "prompts": len(prompt_ids), "prompts_sha256": digest.hexdigest(),
                "response_tokens": response_tokens}
    mpath = d / "manifest.json"
    if mpath.exists():
        have = json.loads(mpath.read_text())
        same = {k: have.get(k) for k in manifest} == manifest
        if not same:
            raise LookaheadKVError(f"{d} holds targets for other prompts or another model; give another "
                                   "--targets folder or delete it")
    else:
        mpath.write_text(json.dumps(manifest, indent=1))
    eos = eos_ids(model, tokenizer)
    groups = _shuffled(_batches([len(x) for x in prompt_ids], batch_size, max_batch_tokens), 0)
    out: list[Target | None] = [None] * len(prompt_ids)
    bar = tqdm(groups, desc="targets", unit="batch", disable=not progress)
    t0 = time.perf_counter()
    for k, group in enumerate(bar):
        shard = d / f"shard_{k:05d}.safetensors"
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s and not shard.exists():
            bar.write(f"targets: time limit reached after {k} of {len(groups)} batches")
            break
        if shard.exists():
            for i, t in _read_shard(shard).items():
                out[i] = t
            continue
        got = collect_batch(model, [prompt_ids[i] for i in group], response_tokens, eos)
        tensors = {}
        for i, t in zip(group, got):
            out[i] = t
            if t is not None:
                tensors.update({f"ids_{i}": t.ids, f"response_{i}": t.response, f"truth_{i}": t.truth.contiguous()})
        save_file(tensors, str(shard) + ".tmp")
        Path(str(shard) + ".tmp").rename(shard)  # a shard is either complete or absent: resumable
    return out


def load_targets(targets_dir: str | Path) -> list[Target | None]:
    """Every stored target of a target folder, by prompt index (None where there is none)."""
    d = Path(targets_dir)
    if not (d / "manifest.json").exists():
        raise LookaheadKVError(f"{d} holds no targets (no manifest.json); run `lookaheadkv train` first")
    out: list[Target | None] = [None] * json.loads((d / "manifest.json").read_text())["prompts"]
    for shard in sorted(d.glob("shard_*.safetensors")):
        for i, t in _read_shard(shard).items():
            out[i] = t
    return out


def _read_shard(path: Path) -> dict[int, Target]:
    tensors = load_file(str(path))
    return {int(k[4:]): Target(tensors[k], tensors[f"response_{k[4:]}"], tensors[f"truth_{k[4:]}"])
            for k in tensors if k.startswith("ids_")}


def kl_loss(pred: list[torch.Tensor], truth: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """KL(true || predicted) over prompt positions, both normalised to sum 1, mean over batch, layers, heads.

    pred: per layer [B, Hq, L] (the lookahead rows' attention); truth: [B, layers, Hq, L] (zeros at pads)."""
    p = torch.stack(pred, dim=1).float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(eps)
    t = truth.float()
    t = t / t.sum(dim=-1, keepdim=True).clamp_min(eps)
    kl = (t * (t.clamp_min(eps).log() - p.clamp_min(eps).log())).sum(dim=-1)
    return kl.mean()


def batch_loss(model, mod: la.LookaheadModule, targets: Sequence[Target], grad: bool) -> torch.Tensor:
    """Prefill the (left-padded) prompts without gradients, then the n-row lookahead pass with them."""
    device = next(model.parameters()).device
    ids, mask = left_pad([t.ids for t in targets])
    with torch.no_grad():
        pf = prefill(model, ids.to(device), mask.to(device))
    rec = la.lookahead_pass(model, mod, pf, grad=grad)
    length = ids.shape[1]
    truth = torch.zeros((len(targets), *targets[0].truth.shape[:2], length), dtype=torch.float32)
    for i, t in enumerate(targets):
        truth[i, ..., length - t.truth.shape[-1]:] = t.truth.float()
    with torch.set_grad_enabled(grad):
        return kl_loss(rec.mean(), truth.to(device))


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def split_validation(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and validation (a seeded share of the training prompts, not the test split)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(1, round(n * share)) if n > 1 and share > 0 else 0
    return sorted(idx[k:]), sorted(idx[:k])


def train(model, tokenizer, out: str | Path, samples: int = 2000, min_tokens: int = 300, max_tokens: int = 3000,
          families: Sequence[str] = FAMILIES, response_tokens: int = 256, epochs: int = 2, batch_size: int = 8,
          lr: float = 2e-3, n: int = 32, rank: int = 8, alpha: int = 32, seed: int = 0, val_share: float = 0.05,
          checkpoint_every: int = 100, targets_dir: str | Path | None = None, collect_batch_size: int = 64,
          max_batch_tokens: int = 200_000, resume: bool = True, progress: bool = True,
          prompt_ids: Sequence[torch.Tensor] | None = None, collect_time_limit_s: float | None = None,
          time_limit_s: float | None = None) -> dict:
    """Train a module for `model` on `samples` training prompts; writes the module and train_log.json to
    `out` and returns the log. Checkpoints to out/checkpoint every `checkpoint_every` steps; a later call with
    the same arguments resumes from there (targets are reused from targets_dir). `prompt_ids` replaces the
    built-in training prompts (token ids, one tensor per prompt). The time limits (seconds) bound target
    collection (fewer prompts) and the training loop (fewer steps); the log says where they cut."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    model.requires_grad_(False)
    t_start = time.perf_counter()
    if prompt_ids is None:
        prompts = training_prompts(tokenizer, samples, min_tokens, max_tokens, families, seed)
        prompt_ids = [tokenizer(p.text(tokenizer), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
                      for p in prompts]
        family = [p.family for p in prompts]
    else:
        family = ["given"] * len(prompt_ids)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(len(x) for x in prompt_ids) + max(response_tokens, n) > limit:
        raise LookaheadKVError(f"training prompts of up to {max(len(x) for x in prompt_ids)} tokens + "
                               f"{response_tokens} response tokens exceed the model's context of {limit}; "
                               "lower --max-tokens")
    t0 = time.perf_counter()
    targets = collect_targets(model, tokenizer, prompt_ids, targets_dir or out / "targets", response_tokens,
                              collect_batch_size, max_batch_tokens, progress, collect_time_limit_s)
    collect_s = time.perf_counter() - t0
    train_idx, val_idx = split_validation(len(prompt_ids), val_share, seed)
    train_idx = [i for i in train_idx if targets[i] is not None]
    val_idx = [i for i in val_idx if targets[i] is not None]
    if not train_idx:
        raise LookaheadKVError("the model answered none of the training prompts; nothing to train on")

    ckpt = out / "checkpoint"
    if resume and (ckpt / "state.pt").exists():
        mod = la.load(model, ckpt)
        mod.embeddings.requires_grad_(True)
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    else:
        mod = la.create(model, n, rank, alpha, seed=seed)
        state = None
    params = mod.parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = [_shuffled(_batches([len(targets[i].ids) for i in train_idx], batch_size, max_batch_tokens // 4),
                           seed + e) for e in range(epochs)]
    total = sum(len(b) for b in per_epoch)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    log = {"steps": [], "validation": []}
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, log = state["step"], state["log"]

    def validate() -> float:
        if not val_idx:
            return float("nan")
        losses = [float(batch_loss(model, mod, [targets[j] for j in val_idx[k:k + batch_size]], grad=False))
                  for k in range(0, len(val_idx), batch_size)]
        return sum(losses) / len(losses)

    if step == 0 and not log["validation"]:
        log["validation"].append({"step": 0, "loss": validate()})
    t1 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress)
    done, stopped = 0, False
    for epoch, batches in enumerate(per_epoch):
        for group in batches:
            done += 1
            if done <= step:
                continue  # resumed: this step was taken before the interruption
            if time_limit_s is not None and time.perf_counter() - t1 > time_limit_s:
                stopped = True
                break
            loss = batch_loss(model, mod, [targets[train_idx[j]] for j in group], grad=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            log["steps"].append({"step": step, "epoch": epoch, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
            if checkpoint_every and step % checkpoint_every == 0 and step < total:
                _checkpoint(model, mod, ckpt, opt, sched, step, log)
        log["validation"].append({"step": step, "epoch": epoch, "loss": validate()})
        if stopped:
            bar.write(f"training: time limit reached at step {step} of {total}")
            break
        bar.write(f"epoch {epoch}: validation KL {log['validation'][-1]['loss']:.4f} "
                  f"(untrained {log['validation'][0]['loss']:.4f})")
    bar.close()
    train_s = time.perf_counter() - t1
    lens = [len(targets[i].ids) for i in train_idx]
    info = {
        "data": {"split": "train (lookaheadkv.data.split_of)", "prompts": len(prompt_ids), "train": len(train_idx),
                 "validation": len(val_idx), "without_target": sum(t is None for t in targets),
                 "families": dict(Counter(family[i] for i in train_idx)),
                 "prompt_tokens": {"min": min(lens), "mean": round(sum(lens) / len(lens)), "max": max(lens)},
                 "response_tokens_cap": response_tokens,
                 "response_tokens_mean": round(sum(len(targets[i].response) for i in train_idx) / len(train_idx), 1),
                 "seed": seed},
        "optimisation": {"epochs": epochs, "steps": step, "planned_steps": total,
                         "stopped_by_time_limit": stopped, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW",
                         "schedule": "linear warmup 5%, cosine to 10%", "grad_clip": 1.0},
        "module": {"n": n, "rank": rank, "alpha": alpha, "targets": list(la.TARGETS)},
        "loss": {"validation_untrained": log["validation"][0]["loss"],
                 "validation_final": log["validation"][-1]["loss"],
                 "train_last_50": sum(s["loss"] for s in log["steps"][-50:]) / max(1, len(log["steps"][-50:]))},
        "time_s": {"targets": round(collect_s, 1), "training": round(train_s, 1),
                   "total": round(time.perf_counter() - t_start, 1)},
        "hardware": hardware(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    la.save(model, mod, out, training=info)
    (out / "train_log.json").write_text(json.dumps({"training": info, **log}, indent=1) + "\n")
    if (ckpt / "state.pt").exists():
        (ckpt / "state.pt").unlink()
    return info


def _shuffled(batches: list[list[int]], seed: int) -> list[list[int]]:
    random.Random(seed).shuffle(batches)
    return batches


def _checkpoint(model, mod, ckpt: Path, opt, sched, step: int, log: dict) -> None:
    la.save(model, mod, ckpt)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "log": log},
               ckpt / "state.pt.tmp")
    (ckpt / "state.pt.tmp").rename(ckpt / "state.pt")


@click.command("train")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True,
              help="named model, local directory or Hub id")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="module directory to write")
@click.option("--samples", default=2000, show_default=True, help="training prompts (train split only)")
@click.option("--min-tokens", default=300, show_default=True)
@click.option("--max-tokens", default=3000, show_default=True)
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--response-tokens", default=256, show_default=True, help="greedy response cap (paper: 512)")
@click.option("--epochs", default=2, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--n", "n_tokens", default=32, show_default=True, help="lookahead embeddings")
@click.option("--rank", default=8, show_default=True)
@click.option("--alpha", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--targets", "targets_dir", type=click.Path(file_okay=False), help="target store (default OUT/targets)")
@click.option("--collect-batch-size", default=64, show_default=True)
@click.option("--checkpoint-every", default=100, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="continue from OUT/checkpoint")
@click.option("--collect-time-limit", type=float, help="seconds for target collection (fewer prompts if exceeded)")
@click.option("--time-limit", type=float, help="seconds for the training loop (fewer steps if exceeded)")
@click.option("--device", default="cpu", show_default=True)
def train_command(model_name, out, samples, min_tokens, max_tokens, families, response_tokens, epochs, batch_size,
                  lr, n_tokens, rank, alpha, seed, targets_dir, collect_batch_size, checkpoint_every, resume,
                  collect_time_limit, time_limit, device):
    """Train a lookahead module (embeddings + LoRA) for a model and write it to OUT."""
    from .models import load_model

    model, tok = load_model(model_name, device=device)
    info = train(model, tok, out, samples, min_tokens, max_tokens, [f for f in families.split(",") if f],
                 response_tokens, epochs, batch_size, lr, n_tokens, rank, alpha, seed,
                 checkpoint_every=checkpoint_every, targets_dir=targets_dir, collect_batch_size=collect_batch_size,
                 resume=resume, collect_time_limit_s=collect_time_limit, time_limit_s=time_limit)
    click.echo(json.dumps({k: info[k] for k in ("data", "loss", "time_s", "hardware")}, indent=1))
    click.echo(f"module written to {out}; use it with --method lookahead --module {out}")

