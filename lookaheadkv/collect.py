"""Training targets, collected fast: each prompt's greedy response by the model itself and the true importance.

True importance (paper.md): for the response Y to a prompt X, the mean over Y's query rows of the softmax
attention onto X's keys, per layer and query head. Those rows are exactly the ones greedy decoding runs, one
per step, so the attention each decode step computes anyway is recorded as it is computed
(attention.attend_and_record): no second, teacher-forced forward.

One batch, start to end:
1. prompts of similar length are prefilled in sub-batches into one preallocated KV buffer, left-padded to the
   batch's longest prompt (no cache tensor is ever concatenated or copied again);
2. greedy decoding: each step writes its token's K/V into the buffer, attends by grouped products over the
   filled part (no repeat_kv copies, no mask built per layer), and adds its softmax row onto the prompt keys
   into a per-sequence sum, weighted 0 once that sequence has finished;
3. EOS is checked on the device; the host looks every `check_every` steps (one sync), stops when all have
   finished, and lets the finished rows leave the batch once half of them have (their targets are taken
   then), so the long tail of a few long answers runs on a small batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import Recording, forward_state
from .prefill import forward, prefill


@dataclass
class Target:
    """One prompt's training target."""

    ids: torch.Tensor  # [L] long: the prompt
    response: torch.Tensor  # [R] long: the model's greedy response (EOS excluded), R >= 1
    truth: torch.Tensor  # [layers, Hq, L]: the response rows' mean attention onto the prompt


def prompt_key(ids: torch.Tensor) -> str:
    """The content hash a prompt's target is stored under (its token ids, not its place in a batch)."""
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return (ids | {getattr(tokenizer, "eos_token_id", None)}) - {None}


class BufferLayer(DynamicLayer):
    """A cache layer over a preallocated [B, Hkv, T, D] buffer: an update writes the new entries after the
    filled part, and `keys`/`values` are views of the filled part (no concatenation, no copy)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int = 0):
        super().__init__()
        self.buffers = (keys, values)
        self.device = keys.device
        self.is_initialized = True
        self._view(filled)

    def _view(self, filled: int) -> None:
        self.keys, self.values = (b[:, :, :filled] for b in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t, n = self.keys.shape[-2], key_states.shape[-2]
        if t + n > self.buffers[0].shape[-2]:
            raise ValueError(f"buffer of {self.buffers[0].shape[-2]} entries cannot take {t + n}")
        self.buffers[0][:, :, t:t + n].copy_(key_states)
        self.buffers[1][:, :, t:t + n].copy_(value_states)
        self._view(t + n)
        return self.keys, self.values

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these sequences (a new, smaller buffer; the old one is released)."""
        filled = self.keys.shape[-2]
        self.buffers = tuple(b.index_select(0, rows) for b in self.buffers)
        self._view(filled)


class _Sums(Recording):
    """The decode steps' recording: per-layer sums over steps of each row's attention onto the prompt, each
    step weighted by whether its sequence was still answering (summed in place, never shared)."""

    def __init__(self, columns: int):
        super().__init__(rows=-1, columns=columns)
        self.weight: torch.Tensor | None = None  # [B]: 1 while the sequence answers, 0 after

    def add(self, layer: int, probs_sum: torch.Tensor, n_rows: int) -> None:
        part = probs_sum[..., : self.columns]
        if layer in self.sums:
            self.sums[layer].addcmul_(part, self.weight[:, None, None])
        else:
            self.sums[layer] = part * self.weight[:, None, None]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.sums = {k: v.index_select(0, rows) for k, v in self.sums.items()}


def plan_batches(lengths: Sequence[int], response_tokens: int, max_tokens: int, max_batch: int = 1024
                 ) -> list[list[int]]:
    """Indices grouped by similar length (little padding): each batch's buffer (rows x (longest prompt +
    response cap)) within max_tokens, at most max_batch rows."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= max_batch or (len(cur) + 1) * (lengths[i] + response_tokens) > max_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def tokens_that_fit(model, response_tokens: int, share: float = 0.5) -> int:
    """Buffer tokens (rows x positions) a batch may hold on this device: `share` of the free memory over
    the bytes one position costs (its K/V in every layer, its fp32 score sums, the step's fp32 softmax)."""
    cfg = model.config
    device = next(model.parameters()).device
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    per_token = kv + 4 * cfg.num_hidden_layers * cfg.num_attention_heads + 12 * cfg.num_attention_heads
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = 4 << 30  # CPU: batches this large already run for minutes
    return max(1, int(free * share / per_token))


@torch.no_grad()
def collect_batch(model, prompts: Sequence[torch.Tensor], response_tokens: int, eos: set[int],
                  prefill_tokens: int = 1 << 16, check_every: int = 16, truth_dtype: torch.dtype = torch.float32
                  ) -> list[Target | None]:
    """Greedy responses (up to `response_tokens`) and true importance for a batch of prompts (best in order of
    length: sub-batches of neighbours are prefilled together); None where the model answers nothing (EOS
    first). The truth comes to the CPU in `truth_dtype` (the store's fp16 halves the copy)."""
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_layers = cfg.num_hidden_layers
    lens = [len(p) for p in prompts]
    batch, longest = len(prompts), max(lens)
    total = longest + response_tokens
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, total, head_dim)
    # Zeros, not empty: the pad slots before a short prompt are read (weighted 0), and 0 x NaN would be NaN.
    buffers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
               for _ in range(n_layers)]
    valid = torch.ones((batch, total), dtype=torch.bool, device=device)
    for i, n in enumerate(lens):
        valid[i, : longest - n] = False

    # 1. Prefill in sub-batches (in order of length), each into its rows of the buffer, ending at `longest`.
    next_logits = []
    start = 0
    while start < batch:
        stop = start + 1
        while stop < batch and (stop + 1 - start) * max(lens[start:stop + 1]) <= prefill_tokens:
            stop += 1
        width = max(lens[start:stop])
        ids = torch.zeros((stop - start, width), dtype=torch.long)
        mask = torch.zeros((stop - start, width), dtype=torch.bool)
        for j, p in enumerate(prompts[start:stop]):
            ids[j, width - len(p):] = p
            mask[j, width - len(p):] = True
        sub = DynamicCache(config=cfg)
        sub.layers = [BufferLayer(k[start:stop, :, longest - width:], v[start:stop, :, longest - width:])
                      for k, v in buffers]
        next_logits.append(prefill(model, ids.to(device), mask.to(device), cache=sub).next_logits)
        start = stop
    cache = DynamicCache(config=cfg)
    cache.layers = [BufferLayer(k, v, longest) for k, v in buffers]
    # The last sub-batch's views would keep the full buffers alive after rows leave the batch (their smaller
    # copies then sat beside them: 1.4x the planned memory on the H200)
    del buffers, sub

    # 2. Greedy decoding, every step's attention onto the prompt recorded as it is computed.
    rec = _Sums(columns=longest)
    sums_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    eos_t = torch.tensor(sorted(eos) or [-1], device=device)
    token = torch.cat(next_logits).argmax(dim=-1)
    positions = torch.tensor(lens, device=device)
    answered = torch.full((batch, response_tokens), -1, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.long, device=device)  # response rows each sequence ran
    rows = torch.arange(batch, device=device)  # original index of each row still in the batch
    out: list[Target | None] = [None] * batch

    def harvest(which: torch.Tensor) -> None:
        """Targets of the rows `which` (current indices), one device-to-host copy for all of them."""
        if len(which) == 0:
            return
        n = steps[which].clamp_min(1).to(rec.sums[0].dtype)
        truth = torch.stack([rec.sums[layer][which] for layer in range(n_layers)], dim=1) / n[:, None, None, None]
        truth, resp, count, orig = (x.cpu() for x in (truth.to(truth_dtype), answered[which], steps[which],
                                                       rows[which]))
        for t, r, c, o in zip(truth, resp, count.tolist(), orig.tolist()):
            if c > 0:
                out[o] = Target(prompts[o].cpu(), r[:c].clone(), t[..., longest - lens[o]:].clone())

    for step in range(response_tokens):
        done |= torch.isin(token, eos_t)
        answered[:, step] = token.masked_fill(done, -1)
        steps += ~done
        if step % check_every == check_every - 1:
            left = int((~done).sum())  # the one host sync every check_every steps
            if left == 0:
                break
            if left <= len(rows) // 2:  # finished rows leave: their targets are complete
                harvest(done.nonzero().squeeze(1))
                keep = (~done).nonzero().squeeze(1)
                for layer in cache.layers:
                    layer.select_rows(keep)
                rec.select_rows(keep)
                valid, token, positions, answered, done, steps, rows = (
                    x.index_select(0, keep) for x in (valid, token, positions, answered, done, steps, rows))
        rec.weight = (~done).to(sums_dtype)
        filled = longest + step + 1
        with forward_state(rec, [valid[:, :filled]] * n_layers):
            logits = forward(model, cache, (positions + step)[:, None], input_ids=token[:, None])
        token = logits[:, -1].argmax(dim=-1)
    harvest(torch.arange(len(rows), device=device))
    return out
