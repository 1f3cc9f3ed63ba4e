"""Train a lookahead module for a model: collect targets once, then minimise KL(true || predicted).

Targets (collect.py): each training prompt's greedy response by the model itself and the true importance of
the prompt per layer and query head, kept in a target store keyed by prompt content (targets.py), so a later
run (another batch size, subset, order, or a resume in another lease) reuses what it shares with earlier ones.

Loss: both score vectors normalised over the prompt positions (sum 1), KL(true || predicted), averaged over
layers, heads and the batch. Only the n embeddings and the LoRA train. The prompt prefill runs under no_grad
with the LoRA off (no trainable parameter touches a prompt row), so gradients flow only through the n-row
lookahead pass: a step costs a prefill plus a 32-row pass, not a backward over the prompt.

Validation (a content-hash share of the prompts, never trained on): the loss and the importance recall at
several budgets, logged during the run; the module kept is the last one.

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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import torch
from tqdm import tqdm

from . import distributed, scoring
from . import lookahead as la
from .collect import Target, collect_batch, eos_ids, plan_batches, prompt_key, tokens_that_fit
from .errors import LookaheadKVError
from .importance import recall_per_sequence
from .prefill import prefill
from .targets import TRUTH_DTYPE, TargetStore, open_store
from .train_data import FAMILIES, load_prompts, save_prompts, training_prompts

BUDGETS = (32, 64, 128, 256)  # budgets the validation recall is logged at


def left_pad(seqs: Sequence[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and bool mask, left-padded."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = True
    return ids, mask


# ---------------------------------------------------------------------------------------------- collection


def collect_targets(model, tokenizer, prompt_ids: Sequence[torch.Tensor], store: TargetStore,
                    response_tokens: int = 256, max_batch_tokens: int | None = None, progress: bool = True,
                    time_limit_s: float | None = None, seed: int = 0) -> dict:
    """Put every prompt's target into `store` (those already there are skipped). Batches hold prompts of
    similar length and run in an order spread over the lengths (spread_order), so a time limit stops with
    targets at every length, not in a few length bands (a shuffle had kept 4 of the 1.5B's 29 batches, all
    over 1.3K tokens, on 2026-12-07). Returns throughput figures.

    Under torchrun every rank plans the same batches and runs every world()-th of them, writing its own shards
    (named by content, so no two ranks write one file); at the end each rank indexes the others' shards too,
    and the figures are the sums over the ranks (seconds: the slowest rank's)."""
    keys = [prompt_key(x) for x in prompt_ids]
    todo = list({k: i for i, k in enumerate(keys) if k not in store}.values())
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    distributed.ensure(device)
    # every rank must plan the same batches: the smallest rank's buffer (free memory differs between GPUs)
    budget = min(distributed.gather(max_batch_tokens or tokens_that_fit(model, response_tokens)))
    groups = plan_batches([len(prompt_ids[i]) for i in todo], response_tokens, budget)
    groups = [groups[i] for i in spread_order(len(groups), seed)]
    groups = distributed.shard(groups)
    stats = {"prompts": 0, "answered": 0, "response_tokens": 0, "prompt_tokens": 0, "batches": 0, "seconds": 0.0,
             "already_stored": len(keys) - len(todo), "batch_tokens": budget}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress = progress and distributed.is_main()
    bar = tqdm(total=sum(len(g) for g in groups), desc="targets", unit="prompt", disable=not progress)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as writer:  # shards are written while the next batch runs
        pending = None
        for group in groups:
            if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                if progress:
                    bar.write(f"targets: time limit reached after {stats['batches']} of {len(groups)} batches")
                break
            ids = [prompt_ids[todo[j]] for j in group]
            got = collect_batch(model, ids, response_tokens, eos, truth_dtype=TRUTH_DTYPE)
            if pending is not None:
                pending.result()
            pending = writer.submit(store.put, [(keys[todo[j]], x, t) for j, x, t in zip(group, ids, got)])
            stats["batches"] += 1
            stats["prompts"] += len(group)
            stats["answered"] += sum(t is not None for t in got)
            stats["response_tokens"] += sum(len(t.response) for t in got if t is not None)
            stats["prompt_tokens"] += sum(len(x) for x in ids)
            bar.update(len(group))
            bar.set_postfix(prompts_s=f"{stats['prompts'] / (time.perf_counter() - t0):.1f}")
        if pending is not None:
            pending.result()
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        # what the allocator held, which jobs beside this one on the GPU cannot have
        stats["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if distributed.world() > 1:
        stats = _sum_stats(distributed.gather(stats))  # also the barrier: every rank's shards are on disk now
        store.reload()
    if stats["prompts"] and distributed.is_main():  # once, for every rank's share
        store.log_collection({**stats, "hardware": hardware(device)})
    return stats


def spread_order(n: int, seed: int = 0) -> list[int]:
    """0..n-1 in an order whose every prefix spreads evenly over the range: the van der Corput sequence (bits of
    k reversed behind the point), shifted by a seeded random offset, scaled to n, repeats skipped."""
    shift = random.Random(seed).random()
    order, seen, k = [], set(), 0
    while len(order) < n:
        x, f, j = 0.0, 0.5, k
        while j:
            x, f, j = x + f * (j & 1), f / 2, j >> 1
        i = int(((x + shift) % 1.0) * n)
        if i not in seen:
            seen.add(i)
            order.append(i)
        k += 1
    return order


def _sum_stats(per_rank: list[dict]) -> dict:
    """Collection figures of all ranks as one run's: counts summed, the slowest rank's seconds."""
    out = dict(per_rank[0], processes=len(per_rank))
    for k in ("prompts", "answered", "response_tokens", "prompt_tokens", "batches"):
        out[k] = sum(r[k] for r in per_rank)
    for k in ("seconds", "peak_gib", "reserved_gib"):
        if k in out:
            out[k] = max(r[k] for r in per_rank)
    return out


# ---------------------------------------------------------------------------------------------- loss


def kl_loss(pred: list[torch.Tensor], truth: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """KL(true || predicted) over prompt positions, both normalised to sum 1, mean over batch, layers, heads.

    pred: per layer [B, Hq, L] (the lookahead rows' attention); truth: [B, layers, Hq, L] (zeros at pads)."""
    # fp32, or fp64 for a float64 model (the tests'): near the optimum the KL is a small difference of logs, and
    # in fp32 batches of other padding widths (other splits over processes) differ in it by ~1e-5
    dt = torch.float64 if pred[0].dtype == torch.float64 else torch.float32
    p = torch.stack(pred, dim=1).to(dt)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(eps)
    t = truth.to(dt)
    t = t / t.sum(dim=-1, keepdim=True).clamp_min(eps)
    kl = (t * (t.clamp_min(eps).log() - p.clamp_min(eps).log())).sum(dim=-1)
    return kl.mean()


def topk_loss(pred: list[torch.Tensor], truth: torch.Tensor, n_kv: int, k: int, eps: float = 1e-10) -> torch.Tensor:
    """How far the prediction is from holding the true top-k as a set: per layer and KV head (query heads averaged,
    as selection and recall see them), the cross-entropy of the predicted scores against a uniform share on each
    of the truth's top-k positions, less its floor log k (0 when the prediction is uniform on exactly that set).
    KL(true || predicted) weighs a position by its true mass, so the top-k's tail (a needle's value tokens in a
    few copy heads: ranks 33-64 hold 88% of recall@64's misses and 5% of the mass) barely counts in it; here
    every member counts alike. Pads (truth 0) are never members, and a sequence shorter than k has fewer."""
    dt = torch.float64 if pred[0].dtype == torch.float64 else torch.float32
    p = torch.stack(pred, dim=1).to(dt)
    b, layers, hq, length = p.shape
    # onto the KV heads as selection scores the prediction and recall ranks the truth; the prediction normalised
    p = scoring.reduce_gqa(p.view(b * layers, hq, length), n_kv, "mean")
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(eps)
    t = scoring.reduce_gqa(truth.to(dt).view(b * layers, hq, length), n_kv, "mean")
    top_t, top = t.topk(min(k, length), dim=-1)
    member = (top_t > 0).to(dt)
    count = member.sum(dim=-1).clamp_min(1)
    ce = -(member * p.gather(-1, top).clamp_min(eps).log()).sum(dim=-1) / count
    return (ce - count.log()).mean()


@dataclass
class Batch:
    """A training batch assembled on the host: left-padded ids and mask, and the truth [B, layers, Hq, L] in the
    store's dtype (zeros at pads). Built in the prefetch thread, in pinned memory when it goes to a GPU, so a step
    issues three asynchronous copies: a copy from pageable memory first waits for the GPU's queue to drain, which
    the truth's 16 per-prompt copies did in the middle of every step."""

    ids: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor

    @staticmethod
    def of(targets: Sequence[Target], pin: bool = False) -> Batch:
        ids, mask = left_pad([t.ids for t in targets])
        layers, hq, length = targets[0].truth.shape[0], targets[0].truth.shape[1], ids.shape[1]
        truth = torch.zeros((len(targets), layers, hq, length), dtype=targets[0].truth.dtype, pin_memory=pin)
        for i, t in enumerate(targets):
            truth[i, ..., length - t.truth.shape[-1]:] = t.truth
        if pin:
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return Batch(ids, mask, truth)

    def __len__(self) -> int:
        return self.ids.shape[0]


def batch_loss(model, mod: la.LookaheadModule, targets: Sequence[Target] | Batch, grad: bool,
               budgets: Sequence[int] = (), topk: tuple[float, int] = (0.0, 64),
               padded: bool | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Prefill the (left-padded) prompts without gradients, then the n-row lookahead pass with them. Returns the
    loss (the KL, plus topk's weight times topk_loss at its k) and, per budget asked for, each sequence's
    importance recall (selecting as the method does). padded: as prefill's (True: no host sync)."""
    device = next(model.parameters()).device
    batch = targets if isinstance(targets, Batch) else Batch.of(targets, pin=device.type == "cuda")
    ids, mask, truth = (x.to(device, non_blocking=True) for x in (batch.ids, batch.mask, batch.truth))
    with torch.no_grad():
        pf = prefill(model, ids, mask, padded=padded)
    rec = la.lookahead_pass(model, mod, pf, grad=grad)
    truth = truth.float()
    pred = rec.mean()
    with torch.set_grad_enabled(grad):
        loss = kl_loss(pred, truth)
        if topk[0]:
            loss = loss + topk[0] * topk_loss(pred, truth, model.config.num_key_value_heads, topk[1])
    recall = {}
    if budgets:
        with torch.no_grad():
            n_kv = model.config.num_key_value_heads
            scores = scoring.score([p.detach() for p in pred], n_kv, "none", 1, "mean")
            per_layer, cache = list(truth.unbind(1)), {}
            for b in budgets:
                kept = scoring.select(scores, [b] * len(scores), pf.valid, None)
                recall[b] = recall_per_sequence(per_layer, kept, b, n_kv, pf.valid, cache)
    return loss, recall


# ---------------------------------------------------------------------------------------------- the run


LR = 3e-3  # the default learning rate of a fresh module


@dataclass
class TrainConfig:
    """Everything that decides a run's result (a resume must be given the same)."""

    samples: int = 2000
    min_tokens: int = 300
    max_tokens: int = 3000
    families: tuple[str, ...] = FAMILIES
    response_tokens: int = 256
    epochs: int = 2
    batch_size: int = 16
    lr: float | None = None  # None: LR, or for a warm start where its module's schedule ended (warm_start_lr)
    n: int = 32
    rank: int = 8
    alpha: int = 32
    seed: int = 0
    val_share: float = 0.05
    val_max: int = 256  # validation prompts scored at each evaluation
    evals: int = 8  # validation evaluations spread over the run (plus one before the first step)
    checkpoint_every: int = 200
    collect_batch_tokens: int | None = None  # None: sized from the device's free memory
    collect_time_limit: float | None = None  # seconds
    time_limit: float | None = None  # seconds for the training loop
    fit_time_limit: bool = False  # shorten the schedule to the steps that fit time_limit, so its decay completes
    warmup: float = 0.05
    final_lr: float = 0.1  # cosine decay to this share of lr
    # the loss: KL(true || predicted) + topk_weight * topk_loss at k = topk (0: the paper's KL alone); validation
    # logs the KL alone, comparable between runs of any weight
    topk_weight: float = 0.0
    topk: int = 64
    # the forward and backward of each step as CUDA graphs (graphed_step.py): one GPU, one process
    cuda_graphs: bool = False
    # start from this module's weights (a directory, or "shipped": the model's own) instead of a fresh one, e.g.
    # to train a shipped module further on new prompts; a new optimizer and schedule, its cost added to this one's
    init: str | None = None

    def check(self) -> None:
        for name in ("samples", "epochs", "batch_size", "n", "response_tokens"):
            if getattr(self, name) < 1:
                raise LookaheadKVError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.topk_weight < 0 or self.topk < 1:
            raise LookaheadKVError(f"need --topk-weight >= 0 and --topk >= 1, got {self.topk_weight}, {self.topk}")
        if self.rank < 0 or self.alpha <= 0 or (self.lr is not None and not self.lr > 0) or not 0 <= self.val_share < 1:
            raise LookaheadKVError("need --rank >= 0, --alpha > 0, --lr > 0 and 0 <= --val-share < 1")
        world = distributed.world()
        if self.cuda_graphs and world > 1:
            raise LookaheadKVError("--cuda-graphs trains in one process; run it without torchrun")
        if self.batch_size % world:
            raise LookaheadKVError(f"--batch-size {self.batch_size} is the global batch, split evenly over the {world} "
                                   f"processes; give a multiple of {world}")


def is_validation(key: str, share: float) -> bool:
    """A prompt's side, from its content hash: the same prompt is on the same side in every run and subset."""
    return int(key[:8], 16) / 16**8 < share


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _epoch_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), regrouped each epoch (lengths jittered by +-10%) and
    shuffled."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * rng.uniform(0.9, 1.1))
    groups = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups


def _prefetch(store: TargetStore, keys: list[str], batches: Iterator[list[int]], pin: bool) -> Iterator[Batch]:
    """Each batch read from the store and assembled one batch ahead (a thread works while the GPU trains)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = lambda group: Batch.of([store.get(keys[i]) for i in group], pin)  # noqa: E731
        nxt = None
        for group in batches:
            cur, nxt = nxt, pool.submit(load, group)
            if cur is not None:
                yield cur.result()
        if nxt is not None:
            yield nxt.result()


def _signature(cfg: TrainConfig, keys: list[str]) -> dict:
    fixed = {k: v for k, v in asdict(cfg).items() if k not in ("collect_batch_tokens", "collect_time_limit",
                                                                 "time_limit", "fit_time_limit", "checkpoint_every",
                                                                 "evals", "cuda_graphs")}
    digest = hashlib.sha256("".join(keys).encode()).hexdigest()
    return {**fixed, "families": list(cfg.families), "prompts_sha256": digest}


def train(model, tokenizer, out: str | Path, cfg: TrainConfig | None = None, *, prompt_ids: Sequence[torch.Tensor]
          | None = None, families: Sequence[str] | None = None, targets_dir: str | Path | None = None,
          resume: bool = True, progress: bool = True, prompt_options: dict | None = None) -> dict:
    """Train a module for `model`; writes the module and train_log.json to `out` and returns the run's record.
    `prompt_ids` (token ids, one tensor per prompt; `families` names each one's family) replaces the built-in
    training prompts; `prompt_options` (a prompt file's: lookaheadkv.train_data.load_prompts) is what built them.
    Checkpoints go to out/checkpoint; a later call with the same configuration resumes there (its targets are
    found in the store by content, or collected again)."""
    cfg = cfg or TrainConfig()
    cfg.check()
    if cfg.cuda_graphs and next(model.parameters()).device.type != "cuda":
        raise LookaheadKVError(f"--cuda-graphs needs a CUDA device; the model is on {next(model.parameters()).device}")
    init, init_meta = _init_module(model, cfg)
    if cfg.lr is None:
        cfg = replace(cfg, lr=warm_start_lr(init_meta) if init else LR)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model.requires_grad_(False)
    t_start = time.perf_counter()
    if prompt_ids is None:
        prompt_options = {"samples": cfg.samples, "min_tokens": cfg.min_tokens, "max_tokens": cfg.max_tokens,
                          "families": list(cfg.families), "seed": cfg.seed}
        prompts = training_prompts(tokenizer, cfg.samples, cfg.min_tokens, cfg.max_tokens, cfg.families, cfg.seed)
        enc = tokenizer([p.text(tokenizer) for p in prompts], add_special_tokens=False)["input_ids"]
        prompt_ids = [torch.tensor(x) for x in enc]
        families = [p.family for p in prompts]
    prompt_ids = list(prompt_ids)[: cfg.samples]
    families = list(families or ["given"] * len(prompt_ids))[: cfg.samples]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(x) for x in prompt_ids)
    if limit is not None and longest + max(cfg.response_tokens, cfg.n) > limit:
        raise LookaheadKVError(f"training prompts of up to {longest} tokens + {cfg.response_tokens} response tokens "
                               f"exceed the model's context of {limit}; lower --max-tokens or --response-tokens")
    keys = [prompt_key(x) for x in prompt_ids]
    distributed.ensure(device)
    store = open_store(targets_dir or out / "targets", la.model_identity(model), cfg.response_tokens)
    collection = collect_targets(model, tokenizer, prompt_ids, store, cfg.response_tokens, cfg.collect_batch_tokens,
                                 progress, cfg.collect_time_limit, cfg.seed)
    answered = {k for k in set(keys) if store.answered(k)}
    seen: set[str] = set()
    train_idx, val_idx = [], []
    for i, k in enumerate(keys):
        if k in answered and k not in seen:  # a prompt drawn twice trains once
            seen.add(k)
            (val_idx if is_validation(k, cfg.val_share) else train_idx).append(i)
    if not train_idx:
        raise LookaheadKVError("the model answered none of the training prompts; nothing to train on")
    val_idx = val_idx[: cfg.val_max]

    ckpt = out / "checkpoint"
    signature = _signature(cfg, keys)
    state = None
    if resume and (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        if state.get("signature") != signature:
            diff = sorted(k for k in signature if state.get("signature", {}).get(k) != signature[k])
            raise LookaheadKVError(f"{ckpt} is a checkpoint of a run with other {', '.join(diff)}; resume it with "
                                   "the same options, or give --no-resume (it is then overwritten)")
        mod = la.load(model, ckpt)
    elif init is not None:
        mod = la.load(model, init)
    else:
        mod = la.create(model, cfg.n, cfg.rank, cfg.alpha, seed=cfg.seed)
    params = mod.parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    lengths = [len(prompt_ids[i]) for i in train_idx]
    per_epoch = [_epoch_batches(lengths, cfg.batch_size, cfg.seed + e) for e in range(cfg.epochs)]
    planned = sum(len(b) for b in per_epoch)
    log: dict = {"steps": [], "validation": [], "horizon": planned}
    step = 0
    if state is not None:
        step, log = state["step"], state["log"]
    # The schedule's length: the planned steps, or (fit_time_limit) those that fit the time limit, fixed once
    # after FIT_STEPS timed steps and kept in the checkpoint, so a resumed run decays on the same schedule
    total = log.setdefault("horizon", planned)
    warmup = lambda: max(1, round(log["horizon"] * cfg.warmup))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup()) * (
        cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / log["horizon"])))))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    prior_s = log.get("train_seconds", 0.0)  # the training loop's time in earlier processes of this run (resumes)
    fit = cfg.fit_time_limit and cfg.time_limit is not None and "fitted" not in log
    evals_at = lambda n: {round(n * (k + 1) / cfg.evals) for k in range(cfg.evals)} if cfg.evals else set()  # noqa: E731
    eval_at = evals_at(total)

    def validate() -> dict:
        """Validation loss and recall; under torchrun each rank scores its share and the sums are gathered."""
        if not val_idx:
            return {"step": step}
        losses, recalls = [], {b: [] for b in BUDGETS}
        mine = distributed.shard(val_idx)
        for k in range(0, len(mine), cfg.batch_size):
            ts = [store.get(keys[i]) for i in mine[k:k + cfg.batch_size]]
            loss, rec = batch_loss(model, mod, ts, grad=False, budgets=BUDGETS)
            losses.append(float(loss) * len(ts))
            for b in BUDGETS:
                recalls[b] += rec[b].tolist()
        parts = distributed.gather((losses, recalls))
        losses = [x for ls, _ in parts for x in ls]
        recalls = {b: [x for _, r in parts for x in r[b]] for b in BUDGETS}
        return {"step": step, "loss": sum(losses) / len(val_idx),
                **{f"recall@{b}": sum(v) / len(v) for b, v in recalls.items()}}

    t0 = time.perf_counter()
    if step == 0 and not log["validation"]:
        log["validation"].append(validate())
    val_s = time.perf_counter() - t0  # one validation's time, reserved for each one still to come when fitting
    t1 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress = progress and distributed.is_main()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress)
    pending: list[torch.Tensor] = []
    stopped, steps_here, prompts_here, t_fit = False, 0, 0, t1
    flat = [g for batches in per_epoch for g in batches]
    step_loss = _step_loss(model, mod, device, (cfg.topk_weight, cfg.topk))
    graphed = None
    if cfg.cuda_graphs:
        from .graphed_step import GraphedStep

        graphed = GraphedStep(lambda b: batch_loss(model, mod, b, grad=True, topk=(cfg.topk_weight, cfg.topk),
                                                   padded=True)[0], params, device)
    # each rank's part of every global batch (global batches do not depend on the number of processes)
    local = [_rank_part(g) for g in flat]
    for targets in _prefetch(store, keys, iter([[train_idx[j] for j in g] for g, _ in local[step:]]),
                             device.type == "cuda"):
        if step >= total:  # a schedule fitted to the time limit is complete
            break
        if cfg.time_limit is not None and distributed.any_rank(time.perf_counter() - t1 > cfg.time_limit):
            stopped = True
            break
        if fit and steps_here == FIT_STEPS:
            now = time.perf_counter()
            left = cfg.time_limit - (now - t1) - val_s * len({e for e in eval_at if e > step})
            # the slowest rank's fit, so that every process stops at the same step (DDP needs each step on all)
            total = log["horizon"] = min(distributed.gather(
                _fitted_horizon(step, total, left, (now - t_fit) / (FIT_STEPS - FIT_STEPS // 4))))
            log["fitted"] = {"planned": planned, "steps": total, "after": step}
            eval_at = evals_at(total)
            bar.total = total
            fit = False
        if steps_here == FIT_STEPS // 4:
            t_fit = time.perf_counter()  # the fit times steps after the first few (warm-up, allocator)
        share = local[step][1]
        if graphed is not None:  # zero, loss, backward, clip, in a CUDA graph
            loss = graphed(targets)
        else:
            loss = step_loss(targets)
            opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: weighted by share x world, the average is the global batch's
            # gradient
            (loss if distributed.world() == 1 else loss * (share * distributed.world())).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        steps_here += 1
        prompts_here += len(flat[step - 1])
        pending.append(loss.detach() if distributed.world() == 1 else loss.detach() * share)
        if len(pending) == 10 or step == total:  # one host sync per 10 steps
            for j, v in enumerate(_global_losses(pending)):
                log["steps"].append({"step": step - len(pending) + j + 1, "loss": v})
            log["steps"][-1]["lr"] = sched.get_last_lr()[0]
            bar.set_postfix(loss=f"{log['steps'][-1]['loss']:.4f}")
            pending = []
        bar.update(1)
        if step in eval_at:
            log["validation"].append(validate())
            v = log["validation"][-1]
            if "loss" in v and distributed.is_main():
                bar.write(f"step {step}: validation KL {v['loss']:.4f}, recall@64 {v['recall@64']:.3f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total and distributed.is_main():
            log["train_seconds"] = prior_s + time.perf_counter() - t1
            _checkpoint(model, mod, ckpt, opt, sched, step, log, signature)
    bar.close()
    train_s = time.perf_counter() - t1
    log["train_seconds"] = prior_s + train_s
    if stopped:
        log["steps"] += [{"step": step - len(pending) + j + 1, "loss": v}
                         for j, v in enumerate(_global_losses(pending))] if pending else []
        if distributed.is_main():
            _checkpoint(model, mod, ckpt, opt, sched, step, log, signature)
            click.echo(f"training: time limit reached at step {step} of {total}; checkpoint in {ckpt} "
                       "(run the same command again to go on)", err=True)
    if log["validation"][-1]["step"] != step:
        log["validation"].append(validate())
    lens = [len(prompt_ids[i]) for i in train_idx]
    cost = store.collection_cost()  # the store's log: every run that collected its targets
    info = {
        "data": {"split": "train (lookaheadkv.data.split_of); validation by content hash", "prompts": len(prompt_ids),
                 "train": len(train_idx), "validation": len(val_idx),
                 "without_target": len(set(keys)) - len(answered),
                 "families": dict(Counter(families[i] for i in train_idx)),
                 "prompt_tokens": {"min": min(lens), "mean": round(sum(lens) / len(lens)), "max": max(lens),
                                   "over_4k": sum(x > 4096 for x in lens)},
                 "response_tokens_cap": cfg.response_tokens, "seed": cfg.seed,
                 # what built the prompts (config's min/max_tokens build them only without a prompt file)
                 "built_with": prompt_options},
        "config": {**asdict(cfg), "families": list(cfg.families)},
        "optimisation": {"steps": step, "planned_steps": planned, "schedule_steps": total,
                         "stopped_by_time_limit": stopped,
                         "optimizer": "AdamW", "schedule": f"linear warmup {cfg.warmup:.0%}, cosine to "
                         f"{cfg.final_lr:.0%} of lr", "grad_clip": 1.0},
        "module": {"n": cfg.n, "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(mod.targets) if cfg.rank else []},
        "validation": {"untrained": log["validation"][0], "final": log["validation"][-1]},
        "collection": collection,
        "throughput": {"train_steps_per_s": steps_here / train_s if train_s else None,
                       "train_prompts_per_s": prompts_here / train_s if train_s else None,
                       "collect_prompts_per_s": collection["prompts"] / collection["seconds"]
                       if collection["prompts"] else None},
        "time_s": {"targets": round(collection["seconds"], 1), "training": round(train_s, 1),
                   "total": round(time.perf_counter() - t_start, 1)},
        "hardware": hardware(device), "processes": distributed.world(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        # What the module cost, whoever collected its targets (the store's log) and however often it resumed
        "cost": {"hardware": hardware(device), "targets_s": cost["seconds"],
                 "targets": cost, "training_s": round(log["train_seconds"], 3),
                 "prompts_with_targets": len(answered), "prompts_trained": len(train_idx), "steps": step},
    }
    info["cost"]["total_s"] = round(info["cost"]["targets_s"] + info["cost"]["training_s"], 3)
    prior = (init_meta.get("training") or {}).get("cost")
    if prior:  # a warm start costs what its starting module cost too
        info["cost"]["init"] = {"module": str(init), **prior}
        info["cost"]["total_s"] = round(info["cost"]["total_s"] + prior.get("total_s", 0.0), 3)
    if device.type == "cuda":
        info["throughput"]["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if graphed is not None:
        info["throughput"]["cuda_graphs"] = graphed.report()
    if distributed.is_main():
        if not stopped:
            la.save(model, mod, out, training=info)
            if (ckpt / "state.pt").exists():
                (ckpt / "state.pt").unlink()
        (out / "train_log.json").write_text(json.dumps({"training": info, **log}, indent=1) + "\n")
    distributed.barrier()  # every rank returns once the module is on disk
    return info


FIT_STEPS = 20


def _fitted_horizon(step: int, total: int, left_s: float, step_s: float) -> int:
    """The schedule's steps when `left_s` seconds remain at `step_s` a step (a 5% margin); never fewer than done,
    nor more than planned."""
    return max(step, min(total, step + int(0.95 * left_s / step_s)))


def _rank_part(group: list[int]) -> tuple[list[int], float]:
    """This rank's part of a global batch and its share of the batch's prompts. A rank left without a prompt
    (a last batch smaller than the number of processes) runs the batch's first one at share 0: every rank
    takes part in each step's gradient all-reduce."""
    mine = distributed.shard(group)
    return (mine, len(mine) / len(group)) if mine else (group[:1], 0.0)


def _step_loss(model, mod: la.LookaheadModule, device: torch.device, topk: tuple[float, int]):
    """The training loss of one rank's targets: batch_loss itself in one process; under torchrun through
    DistributedDataParallel, which all-reduces (averages) the gradients of the embeddings and the LoRA."""
    if distributed.world() == 1:
        return lambda targets: batch_loss(model, mod, targets, grad=True, topk=topk)[0]
    from torch.nn.parallel import DistributedDataParallel

    # the last layer's v, o and MLP LoRA get no gradient
    ddp = DistributedDataParallel(_Trainable(model, mod, topk),
                                  device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=True)
    return lambda targets: ddp(_Targets(targets))


class _Targets:
    """A batch's targets, opaque to DDP (which would otherwise copy every tensor inside to the device)."""

    def __init__(self, targets: list[Target] | Batch):
        self.targets = targets


class _Trainable(torch.nn.Module):
    """What DDP wraps: only the trainable tensors (the embeddings and the LoRA layers), so the frozen base
    model is neither broadcast nor checked at the start; forward is the training loss of a batch."""

    def __init__(self, model, mod: la.LookaheadModule, topk: tuple[float, int]):
        super().__init__()
        self.embeddings = mod.embeddings
        self.lora = torch.nn.ModuleList(d[la.ADAPTER] for layer in la._lora_layers(model)
                                        for d in (layer.lora_A, layer.lora_B))
        # the model stays unregistered
        self._loss = lambda targets: batch_loss(model, mod, targets, grad=True, topk=topk)[0]

    def forward(self, batch: _Targets) -> torch.Tensor:
        return self._loss(batch.targets)


def _global_losses(pending: list[torch.Tensor]) -> list[float]:
    """The global batches' losses from each rank's share-weighted ones (one host sync)."""
    return distributed.sum_cpu(torch.stack(pending).cpu()).tolist()


def _init_module(model, cfg: TrainConfig) -> tuple[Path | None, dict]:
    """The module a warm start begins from and its lookahead.json (checked before any work), or (None, {})."""
    if cfg.init is None:
        return None, {}
    path = la.shipped_module(model) if cfg.init == "shipped" else Path(cfg.init)
    if not path.is_dir():
        raise LookaheadKVError(f"--init {cfg.init}: no such module directory")
    meta = la._read_meta(path)
    if (meta["n"], meta["rank"], meta["alpha"]) != (cfg.n, cfg.rank, cfg.alpha):
        raise LookaheadKVError(f"--init {path} has n={meta['n']}, rank={meta['rank']}, alpha={meta['alpha']}; "
                               f"give the same --n, --rank and --alpha (got {cfg.n}, {cfg.rank}, {cfg.alpha})")
    return path, meta


def warm_start_lr(meta: dict) -> float:
    """A warm start's default learning rate: where its module's own schedule ended (lr x final_lr). Fresh AdamW
    moments at the full 3e-3 undid a trained module (2026-12-02, Qwen2.5-Coder-1.5B: validation recall@64 0.775 at
    the start, 0.630 after 42 steps, 0.744 after 168; results/train/qwen2.5-coder-1.5b-instruct_h200/runs/)."""
    c = (meta.get("training") or {}).get("config") or {}
    return float(c.get("lr") or LR) * float(c.get("final_lr", 0.1))


def _checkpoint(model, mod, ckpt: Path, opt, sched, step: int, log: dict, signature: dict) -> None:
    la.save(model, mod, ckpt)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "log": log,
                "signature": signature}, ckpt / "state.pt.tmp")
    (ckpt / "state.pt.tmp").rename(ckpt / "state.pt")


@click.command("train")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True,
              help="named model, local directory or Hub id")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="module directory to write")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, exists=True),
              help="training prompts made by `lookaheadkv prompts` (default: built here from the options below)")
@click.option("--samples", default=2000, show_default=True, help="training prompts (train split only)")
@click.option("--min-tokens", default=300, show_default=True)
@click.option("--max-tokens", default=3000, show_default=True)
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--response-tokens", default=256, show_default=True, help="greedy response cap (paper: 512)")
@click.option("--epochs", default=2, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", type=float, help="learning rate [default: 3e-3; with --init, where its module's schedule ended]")
@click.option("--n", "--lookahead-tokens", "n_tokens", default=32, show_default=True,
              help="lookahead embeddings (under torchrun write --lookahead-tokens: its parser takes --n for its own)")
@click.option("--rank", default=8, show_default=True, help="LoRA rank (0: lookahead embeddings alone)")
@click.option("--alpha", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--targets", "targets_dir", type=click.Path(file_okay=False), help="target store (default OUT/targets)")
@click.option("--collect-batch-tokens", type=int, help="buffer tokens per collection batch (default: from free memory)")
@click.option("--checkpoint-every", default=200, show_default=True)
@click.option("--evals", default=8, show_default=True, help="validation evaluations during the run")
@click.option("--resume/--no-resume", default=True, show_default=True, help="continue from OUT/checkpoint")
@click.option("--collect-time-limit", type=float, help="seconds for target collection (fewer prompts if exceeded)")
@click.option("--time-limit", type=float, help="seconds for the training loop (a checkpoint to go on from)")
@click.option("--fit-time-limit", is_flag=True,
              help="shorten the schedule to the steps that fit --time-limit (timed over the first steps), so the "
                   "learning rate's decay completes and a module is written")
@click.option("--topk-weight", default=0.0, show_default=True,
              help="add this weight times the top-k set loss (every true top-k position alike) to the KL")
@click.option("--topk", default=64, show_default=True, help="k of --topk-weight (a budget)")
@click.option("--init", help="start from this module's weights (DIR, or `shipped`: the model's shipped module), "
                             "e.g. to train it further on new prompts")
@click.option("--cuda-graphs", is_flag=True, help="each step's forward and backward as a CUDA graph (one GPU)")
@click.option("--device", default="cpu", show_default=True)
def train_command(model_name, out, prompts_file, samples, min_tokens, max_tokens, families, response_tokens, epochs,
                  batch_size, lr, n_tokens, rank, alpha, seed, targets_dir, collect_batch_tokens, checkpoint_every,
                  evals, resume, collect_time_limit, time_limit, fit_time_limit, topk_weight, topk, init, cuda_graphs,
                  device):
    """Train a lookahead module (embeddings + LoRA) for a model and write it to OUT."""
    from .models import load_model

    cfg = TrainConfig(samples, min_tokens, max_tokens, tuple(f for f in families.split(",") if f), response_tokens,
                      epochs, batch_size, lr, n_tokens, rank, alpha, seed, checkpoint_every=checkpoint_every,
                      evals=evals, collect_batch_tokens=collect_batch_tokens, collect_time_limit=collect_time_limit,
                      time_limit=time_limit, fit_time_limit=fit_time_limit, topk_weight=topk_weight, topk=topk,
                      init=init, cuda_graphs=cuda_graphs)
    cfg.check()
    device = distributed.device_for(device)
    if cuda_graphs and not device.startswith("cuda"):
        raise LookaheadKVError(f"--cuda-graphs needs a CUDA device, not --device {device}")
    ids = fams = options = None
    if prompts_file:
        ids, fams, options = load_prompts(prompts_file)
        options = {"file": Path(prompts_file).name, **options}
    model, tok = load_model(model_name, device=device)
    info = train(model, tok, out, cfg, prompt_ids=ids, families=fams, targets_dir=targets_dir, resume=resume,
                 prompt_options=options)
    if not distributed.is_main():
        return
    click.echo(json.dumps({k: info[k] for k in ("data", "validation", "throughput", "time_s", "hardware",
                                                "processes")}, indent=1))
    if not info["optimisation"]["stopped_by_time_limit"]:
        click.echo(f"module written to {out}; use it with --method lookahead --module {out}")



@click.command("prompts")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True,
              help="named model, local directory or Hub id (its tokenizer and chat format)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="prompt file to write (.safetensors)")
@click.option("--samples", default=2000, show_default=True, help="training prompts (train split only)")
@click.option("--min-tokens", default=300, show_default=True)
@click.option("--max-tokens", default=3000, show_default=True)
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--seed", default=0, show_default=True)
def prompts_command(model_name, out, samples, min_tokens, max_tokens, families, seed):
    """Build training prompts once (token ids), for `lookaheadkv train --prompts FILE` here or elsewhere."""
    from transformers import AutoTokenizer

    from .models import resolve

    if Path(out).exists():
        raise LookaheadKVError(f"{out} exists; give another --out or delete it")
    if samples < 1:
        raise LookaheadKVError(f"--samples must be at least 1, got {samples}")
    tok = AutoTokenizer.from_pretrained(resolve(model_name))
    fams = tuple(f for f in families.split(",") if f)
    prompts = training_prompts(tok, samples, min_tokens, max_tokens, fams, seed, progress=True)
    ids = tok([p.text(tok) for p in prompts], add_special_tokens=False)["input_ids"]
    options = {"model": model_name, "samples": samples, "min_tokens": min_tokens, "max_tokens": max_tokens,
               "families": list(fams), "seed": seed}
    save_prompts(out, ids, [p.family for p in prompts], options)
    n = sum(len(x) for x in ids)
    click.echo(f"{len(ids)} prompts, {n} tokens (mean {n / len(ids):.0f}, longest {max(map(len, ids))}) in {out}")


@click.command("targets")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True)
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False, exists=True),
              help="prompt file made by `lookaheadkv prompts`")
@click.option("--targets", "targets_dir", required=True, type=click.Path(file_okay=False), help="target store")
@click.option("--samples", type=int, help="the first SAMPLES prompts of the file (default: all)")
@click.option("--response-tokens", default=256, show_default=True, help="greedy response cap (paper: 512)")
@click.option("--batch-tokens", type=int, help="buffer tokens per collection batch (default: from free memory)")
@click.option("--time-limit", type=float, help="seconds (what is left, spread over the lengths, waits for a rerun)")
@click.option("--seed", default=0, show_default=True, help="batch order")
@click.option("--device", default="cpu", show_default=True)
def targets_command(model_name, prompts_file, targets_dir, samples, response_tokens, batch_tokens, time_limit, seed,
                    device):
    """Collect training targets (responses + true importance) for a prompt file into a target store, so that
    several `lookaheadkv train --targets DIR` runs (ablations, a later lease) share them."""
    from .models import load_model

    if response_tokens < 1 or (samples is not None and samples < 1):
        raise LookaheadKVError("--response-tokens and --samples must be at least 1")
    ids, _, _ = load_prompts(prompts_file)
    model, tok = load_model(model_name, device=distributed.device_for(device))
    distributed.ensure(next(model.parameters()).device)
    store = open_store(targets_dir, la.model_identity(model), response_tokens)
    stats = collect_targets(model, tok, ids[:samples], store, response_tokens, batch_tokens, time_limit_s=time_limit,
                            seed=seed)
    if distributed.is_main():
        click.echo(json.dumps({**stats, "stored": len(store)}, indent=1))
