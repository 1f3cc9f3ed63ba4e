"""Our attention function: transformers' SDPA plus two optional duties during our own forward calls.

1. Record the attention that chosen query rows pay to the keys (the "glimpse"), computed only for those
   rows, in fp32, per query head, with GQA handled by grouping (no repeat_kv copies). Nothing ever
   materialises prompt x prompt attention: all-rows recording (H2O) runs in chunks of rows. In a prompt's
   own causal call the attention kernel torch picks also returns each row's softmax normaliser (its
   log-sum-exp), so the recording takes one pass over the keys instead of two (`prompt_attention`). A call
   that records all its few rows (decode steps, lookahead and draft rows) gets output and recording from one
   product (`attend_and_record`); a half-precision decode step on CUDA from one fused Triton kernel that
   reads K and V once (kernels.decode_attention).
2. Apply a per-layer key-validity mask. After per-layer eviction (PyramidKV) of a left-padded batch the
   layers hold different numbers of entries, so one mask built by transformers cannot fit all of them.
3. After eviction, take each layer's mask from the evicted cache (cache.EvictableCache), which knows the
   original position of every entry it holds: sliding-window layers stay sliding-window layers.
4. Inside `capture_queries`, keep every call's post-RoPE query rows per layer (LAQ's pseudo queries: the
   queries its draft computes while it decodes on a compressed copy, scored afterwards against the full
   prompt's keys).

Sliding windows and attention-logit soft-capping (Gemma 2) arrive as the `sliding_window` and `softcap`
keyword arguments that transformers' attention modules pass to every attention function; both are applied
to the recorded rows too, so the glimpse is the attention the model really computes.

It is registered under the name "lookaheadkv" through transformers' public attention and mask registries.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import kernels

NAME = "lookaheadkv"
ROW_CHUNK = 256  # query rows scored at once when recording every row


@dataclass
class Recording:
    """Sum over recorded query rows of softmax(q k^T) restricted to the first `columns` keys.

    rows: how many of each forward's last query rows to record (-1: all of them).
    columns: how many leading keys (the prompt) to keep in the sums; None keeps all keys.
    """

    rows: int
    columns: int | None = None
    grad: bool = False  # keep the graph (training the lookahead module); otherwise scores are detached
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Hq, columns] fp32
    count: dict[int, int] = field(default_factory=dict)
    # [B] per-sequence weight of this call's rows (target collection: 0 once a sequence has finished); the
    # caller then keeps the per-sequence row counts itself. None: every row counts.
    weight: torch.Tensor | None = None

    def add(self, layer: int, probs_sum: torch.Tensor, n_rows: int) -> None:
        if self.columns is not None:
            probs_sum = probs_sum[..., : self.columns]
        if self.weight is not None:
            probs_sum = probs_sum * self.weight.to(probs_sum.device)[:, None, None]
        if layer in self.sums:
            self.sums[layer] = self.sums[layer] + probs_sum
            self.count[layer] += n_rows
        else:
            self.sums[layer] = probs_sum
            self.count[layer] = n_rows

    def copy(self) -> Recording:
        """A copy whose sums can be added to without changing this one (the tensors are shared)."""
        return Recording(self.rows, self.columns, self.grad, dict(self.sums), dict(self.count), self.weight)

    def merge(self, other: Recording) -> Recording:
        """Pool the rows of two recordings (e.g. a prompt window and draft rows)."""
        for layer in other.sums:
            self.add(layer, other.sums[layer], other.count[layer])
        return self

    def mean(self) -> list[torch.Tensor]:
        """Per layer [B, Hq, columns]: the mean attention of the recorded rows."""
        return [self.sums[i] / self.count[i] for i in sorted(self.sums)]


@dataclass
class ForwardState:
    record: Recording | list[Recording] | None = None
    key_valid: list[torch.Tensor] | None = None  # per layer [B, T_stored] bool; None: no padding anywhere


_STATE: contextvars.ContextVar[ForwardState | None] = contextvars.ContextVar("lookaheadkv_state", default=None)


@contextlib.contextmanager
def forward_state(record: Recording | list[Recording] | None = None,
                  key_valid: list[torch.Tensor] | None = None) -> Iterator[None]:
    token = _STATE.set(ForwardState(record, key_valid))
    try:
        yield
    finally:
        _STATE.reset(token)


def storage_mask(key_valid: torch.Tensor | None, n_rows: int, n_keys: int, first_row: int | None = None,
                 device: torch.device | None = None, window: int | None = None) -> torch.Tensor:
    """[B or 1, 1, n_rows, n_keys] bool: causal in storage order, minus invalid (pad) keys.

    Row r sits at storage index `first_row + r` (default: the last n_rows keys). Each row may also
    see itself, so a pad row never has an empty softmax (its output is never used). `window` (a sliding
    layer's) hides keys `window` or more slots back, as transformers' sliding mask does; storage order is
    slot order until eviction, which is the only time this mask serves a sliding layer.
    """
    first = n_keys - n_rows if first_row is None else first_row
    device = key_valid.device if key_valid is not None else device
    row_idx = torch.arange(first, first + n_rows, device=device)[:, None]
    key_idx = torch.arange(n_keys, device=device)[None, :]
    mask = key_idx <= row_idx
    if window is not None:
        mask = mask & (key_idx > row_idx - window)
    mask = mask[None, None]
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :]) | (key_idx == row_idx)[None, None]
    return mask


def row_sums(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int, lse: torch.Tensor
             ) -> torch.Tensor:
    """row_attention (causal, no pads) for rows whose log-sum-exp lse [B, Hq, R] is known (from the attention
    call itself): the sum over rows of exp(q k^T * scaling - lse), one pass over the keys, no softmax."""
    if kernels.pays(query):
        return kernels.row_sums(query, key, scaling, first_row, lse)
    b, hq, r, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    dt = _score_dtype(query)
    q = query.to(dt).reshape(b, hkv, hq // hkv * r, d).reshape(b * hkv, -1, d)
    logits = torch.baddbmm(query.new_zeros((), dtype=dt), q, key.to(dt).reshape(b * hkv, tk, d).transpose(1, 2),
                           beta=0.0, alpha=scaling).view(b, hkv, hq // hkv, r, tk)
    logits -= lse.to(dt).view(b, hkv, hq // hkv, r, 1)
    lo = first_row + 1
    if lo < tk:  # a row is hidden only the keys after its own index
        rows = torch.arange(first_row, first_row + r, device=query.device)[:, None]
        logits[..., lo:].masked_fill_(torch.arange(lo, tk, device=query.device)[None, :] > rows, float("-inf"))
    return logits.exp_().sum(dim=3).reshape(b, hq, tk)


def _needs_grad(*xs: torch.Tensor) -> bool:
    """Whether this call builds an autograd graph (training): the fused kernels have no backward."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    """Scores are computed in fp32, or in fp64 for a float64 model (the tests' tiny models, exact to 1e-12)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def row_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int,
                  key_valid: torch.Tensor | None, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """Sum over rows of softmax attention, [B, Hq, Tk] fp32, for query rows [B, Hq, R, D] at storage
    index first_row.. over keys [B, Hkv, Tk, D]; query heads are grouped onto their KV head."""
    if window is not None or softcap is not None:
        return windowed_row_attention(query, key, scaling, first_row, key_valid, window, softcap)
    b, hq, r, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    dt = _score_dtype(query)
    q = query.to(dt).view(b, hkv, hq // hkv, r, d)
    if _needs_grad(query, key):
        logits = torch.einsum("bhgrd,bhkd->bhgrk", q, key.to(dt)) * scaling
        mask = storage_mask(key_valid, r, tk, first_row, device=query.device)  # [B|1, 1, R, Tk]
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        return logits.softmax(dim=-1).sum(dim=3).reshape(b, hq, tk)
    if kernels.pays(query):  # fused: the logits never reach memory
        return kernels.row_attention(query, key, scaling, first_row, key_valid)
    # Inference: the [B*Hkv, G*R, Tk] fp32 logits are the only large tensor; scaled inside the product, masked
    # only where the causal mask can hide a key, then one softmax and one sum (measured on the H200 at 32K:
    # ~0.7 ms a layer for the earlier seven-pass version, the bulk of SnapKV's eviction cost).
    logits = torch.baddbmm(query.new_zeros((), dtype=dt), q.reshape(b * hkv, -1, d),
                           key.to(dt).reshape(b * hkv, tk, d).transpose(1, 2), beta=0.0, alpha=scaling)
    logits = logits.view(b, hkv, hq // hkv, r, tk)
    if key_valid is None:  # causal only: a row can be hidden just the keys after its own index
        lo = first_row + 1
        if lo < tk:
            rows = torch.arange(first_row, first_row + r, device=query.device)[:, None]
            logits[..., lo:].masked_fill_(torch.arange(lo, tk, device=query.device)[None, :] > rows, float("-inf"))
    else:
        mask = storage_mask(key_valid, r, tk, first_row, device=query.device)
        logits.masked_fill_(~mask[:, :, None], float("-inf"))
    return logits.softmax(dim=-1).sum(dim=3).reshape(b, hq, tk)


# A call that records all its rows is fused when it has at most FUSED_ROWS rows (decode steps, lookahead, draft
# and answer rows; never a long prompt's own rows, which H2O records in chunks) and its logits stay small.
FUSED_ROWS, FUSED_ELEMENTS = 512, 1 << 27


_BMM_OUT_DTYPE = True  # until a call shows this torch lacks it


def _logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """[N, R, D] x [N, T, D] -> [N, R, T] fp32 logits, scaled. Half precision on CUDA multiplies on the tensor
    cores straight into fp32 (no fp32 copy of the keys, which would double the bytes read)."""
    global _BMM_OUT_DTYPE
    if k.is_cuda and k.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled() and _BMM_OUT_DTYPE:
        try:
            return torch.bmm(q.to(k.dtype), k.transpose(1, 2), out_dtype=torch.float32).mul_(scaling)
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=...): upcast from now on
            _BMM_OUT_DTYPE = False
    dt = _score_dtype(k)
    return torch.bmm(q.to(dt), k.to(dt).transpose(1, 2)) * scaling


def attend_and_record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                      key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the last R = query rows (storage index Tk-R..) computed once for both duties: the output
    [B, R, Hq, D] (as transformers' attention functions return it) and the sum over rows of the softmax
    [B, Hq, Tk] fp32. For calls that record every row they run (decode steps, lookahead and draft rows), this
    replaces SDPA plus a second product for the recording; GQA by grouping, no repeat_kv copies. A decode step
    (one row) in half precision goes to the fused kernel (kernels.decode_attention: K and V read once)."""
    b, hq, r, d = query.shape
    if r == 1 and kernels.pays(query) and not _needs_grad(query, key, value):
        return kernels.decode_attention(query, key, value, scaling, key_valid)
    hkv, tk = key.shape[1], key.shape[2]
    g = hq // hkv
    q = query.reshape(b, hkv, g * r, d).reshape(b * hkv, g * r, d)
    logits = _logits(q, key.reshape(b * hkv, tk, d), scaling).view(b, hkv, g, r, tk)
    if r == 1 and key_valid is not None:  # a decode step: it sees every stored key but the pads
        logits = logits.masked_fill(~key_valid[:, None, None, None, :], float("-inf"))
    elif r > 1:
        mask = storage_mask(key_valid, r, tk, device=query.device)  # [B|1, 1, R, Tk]
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    out = torch.bmm(probs.view(b * hkv, g * r, tk).to(value.dtype), value.reshape(b * hkv, tk, value.shape[-1]))
    out = out.view(b, hq, r, -1).transpose(1, 2).contiguous()
    return out, (probs.squeeze(3) if r == 1 else probs.sum(dim=3)).reshape(b, hq, tk)


def _fusable(module, query: torch.Tensor, key: torch.Tensor, records: list[Recording], kwargs: dict) -> bool:
    """Whether one product can serve output and recording: every recording takes all of this call's rows, the
    rows are few, and nothing SDPA would add (dropout, softcap, sliding window, sinks) is asked for."""
    if len(records) != 1 or not (records[0].rows < 0 or records[0].rows >= query.shape[2]):
        return False
    if query.shape[2] > FUSED_ROWS or key.shape[2] <= query.shape[2]:  # rows after a cache, not a prompt's own
        return False
    if kwargs.get("dropout") or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        return False
    if getattr(module, "sinks", None) is not None or query.shape[1] % key.shape[1]:
        return False
    return query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] <= FUSED_ELEMENTS


def _grouped_logits(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """[B, Hkv, G, R, Tk] fp32 logits of query rows [B, Hq, R, D] over keys [B, Hkv, Tk, D] (no repeat_kv),
    soft-capped as cap * tanh(logits / cap) where the model does so."""
    b, hq, r, d = query.shape
    hkv = key.shape[1]
    dt = _score_dtype(query)
    q = query.to(dt).reshape(b, hkv, hq // hkv * r, d)
    logits = (q @ key.to(dt).transpose(-1, -2) * scaling).view(b, hkv, hq // hkv, r, key.shape[2])
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def windowed_row_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int,
                           key_valid: torch.Tensor | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """row_attention for a sliding-window or soft-capped layer: the same sum, under that layer's own mask and
    logits (the fused kernel and the fast path know neither)."""
    b, hq, r, _ = query.shape
    logits = _grouped_logits(query, key, scaling, softcap)
    mask = storage_mask(key_valid, r, key.shape[2], first_row, device=query.device, window=window)
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    return logits.softmax(dim=-1).sum(dim=3).reshape(b, hq, key.shape[2])


def softcapped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, softcap: float
                         ) -> tuple[torch.Tensor, None]:
    """Attention with soft-capped logits (Gemma 2), which SDPA cannot compute: fp32 softmax as transformers'
    eager path, query heads grouped onto their KV head (no repeat_kv), query rows in chunks of ROW_CHUNK so
    a long prompt never holds all its logits at once. Returns [B, R, Hq, D] like the other functions."""
    b, hq, r, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if attention_mask is None:
        attention_mask = storage_mask(None, r, tk, device=query.device)
    out = []
    for s in range(0, r, ROW_CHUNK):
        e = min(s + ROW_CHUNK, r)
        logits = _grouped_logits(query[:, :, s:e], key, scaling, softcap)  # [B, Hkv, G, rows, Tk]
        m = attention_mask[:, :, s:e]  # [B|1, 1|Hq, rows, Tk] -> grouped like the logits
        m = m.reshape(m.shape[0], hkv, hq // hkv, e - s, tk) if m.shape[1] > 1 else m[:, :, None]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
        probs = logits.softmax(dim=-1).to(value.dtype)
        out.append((probs @ value[:, :, None]).reshape(b, hq, e - s, d))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _record(rec: Recording, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
            scaling: float, key_valid: torch.Tensor | None, window: int | None = None,
            softcap: float | None = None, lse: torch.Tensor | None = None) -> None:
    """Add this call's recorded rows to rec; with `lse` (each query row's log-sum-exp, from the attention
    call; causal rows, no pads, no window or soft-cap) in one pass over the keys."""
    n_q, n_k = query.shape[2], key.shape[2]
    rows = n_q if rec.rows < 0 else min(rec.rows, n_q)
    start = n_q - rows

    def part(s: int, e: int, seen: int) -> torch.Tensor:
        if lse is not None:
            return row_sums(query[:, :, s:e], key[:, :, :seen], scaling, n_k - n_q + s, lse[:, :, s:e])
        return row_attention(query[:, :, s:e], key[:, :, :seen], scaling, n_k - n_q + s,
                             None if key_valid is None else key_valid[:, :seen], window, softcap)

    if n_q - start <= ROW_CHUNK:  # the usual glimpse: one chunk, all keys
        total = part(start, n_q, n_k)
    else:
        total = query.new_zeros(query.shape[0], query.shape[1], n_k, dtype=_score_dtype(query))
        for s in range(start, n_q, ROW_CHUNK):
            e = min(s + ROW_CHUNK, n_q)
            total[..., :n_k - n_q + e] += part(s, e, n_k - n_q + e)  # later keys are hidden from all its rows
    rec.add(module.layer_idx, total, rows)


_LSE_OK = True  # until a call shows this torch or device cannot


def _lse_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    """(output [B, Hq, L, D], log-sum-exp [B, Hq, L]) of the causal attention of a prompt's own call, from the
    backend torch's dispatcher chooses for it (respecting sdpa_kernel), or None where that backend's op
    returns no log-sum-exp (math) or cannot take the call."""
    gqa = query.shape[1] != key.shape[1]
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scaling, enable_gqa=gqa)
    if choice == SDPBackend.FLASH_ATTENTION.value:
        if query.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                                   scale=scaling)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True,
                                                                          scale=scaling)[:2]
    elif choice == SDPBackend.CUDNN_ATTENTION.value:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True,
                                                                      scale=scaling)[:2]
    elif choice == SDPBackend.EFFICIENT_ATTENTION.value and not gqa:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0,
                                                                          True, scale=scaling)[:2]
    else:
        return None
    b, hq, n = query.shape[:3]
    lse = lse[..., :n]  # the memory-efficient kernel pads its rows
    if out.shape != query.shape[:3] + value.shape[3:] or lse.numel() != b * hq * n:
        raise RuntimeError(f"unexpected shapes from SDPA backend {choice}: {tuple(out.shape)}, {tuple(lse.shape)}")
    return out, lse.reshape(b, hq, n)


_LSE_BACKENDS = (SDPBackend.FLASH_ATTENTION.value, SDPBackend.CUDNN_ATTENTION.value)


def lse_applies(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a prompt's own causal call of this shape gets its rows' log-sum-exp from the attention kernel
    (prompt_attention), judged by torch's backend choice for a small probe of it."""
    if not _LSE_OK or os.environ.get("LOOKAHEADKV_NO_SDPA_LSE") == "1":
        return False
    q = torch.zeros(1, heads, 16, head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, kv_heads, 16, head_dim, dtype=dtype, device=device)
    choice = torch._fused_sdp_choice(q, k, k, None, 0.0, True, scale=1.0, enable_gqa=heads != kv_heads)
    return choice in _LSE_BACKENDS or (choice == SDPBackend.EFFICIENT_ATTENTION.value and heads == kv_heads)


_LSE_CHECKED: set[tuple] = set()


def _lse_checked(query, key, value, scaling, out, lse) -> bool:
    """Once per device, dtype and head layout: the private op's output equals public SDPA's and its rows'
    probabilities from the log-sum-exp sum to 1 (a private op's contract may change between torch releases)."""
    tag = (query.device.type, query.dtype, query.shape[1], key.shape[1])
    if tag in _LSE_CHECKED:
        return True
    ref = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    tol = 1e-5 if query.dtype in (torch.float32, torch.float64) else 2e-2
    n = query.shape[2]
    total = row_sums(query[:, :, -1:], key, scaling, n - 1, lse[:, :, -1:]).sum(dim=-1)  # each row's softmax: 1
    ok = bool((out - ref).abs().max() <= tol * ref.abs().max().clamp(min=1)) and bool(((total - 1).abs() < 1e-2).all())
    if ok:
        _LSE_CHECKED.add(tag)
    return ok


def prompt_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     records: list[Recording]) -> torch.Tensor | None:
    """A prompt's own causal call (no mask, no cache before it) that records some of its rows: the output
    [B, L, Hq, D] as transformers' sdpa returns it, from the same kernel, which also gives each row's
    log-sum-exp, so each recording takes a single pass over the keys (the softmax's normaliser comes out of
    the attention call). None where it does not apply: the caller records and attends as usual.
    LOOKAHEADKV_NO_SDPA_LSE=1 switches it off (to time or check the two paths against each other)."""
    global _LSE_OK
    if not _LSE_OK or os.environ.get("LOOKAHEADKV_NO_SDPA_LSE") == "1" or not getattr(module, "is_causal", True):
        return None
    if any(rec.grad for rec in records) and torch.is_grad_enabled():
        return None
    if getattr(module, "sinks", None) is not None or query.shape[1] % key.shape[1] or key.dtype != query.dtype:
        return None
    try:
        got = _lse_op(query, key, value, scaling)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):  # this torch or device: never again
        _LSE_OK = False
        return None
    if got is None:
        return None
    out, lse = got
    if not _lse_checked(query, key, value, scaling, out, lse):
        _LSE_OK = False
        return None
    for rec in records:
        _record(rec, module, query, key, scaling, None, lse=lse)
    return out.transpose(1, 2).contiguous()


@dataclass
class Queries:
    """The post-RoPE query rows of every forward call inside `capture_queries`, per layer, with what scoring
    them needs: the layer's scaling, sliding window and soft-cap."""

    rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> one [B, Hq, q, D] per call
    how: dict[int, tuple[float, int | None, float | None]] = field(default_factory=dict)

    def add(self, layer: int, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None) -> None:
        self.rows.setdefault(layer, []).append(query)
        self.how[layer] = (scaling, window, softcap)

    @property
    def n(self) -> int:
        """Rows captured per layer."""
        return sum(q.shape[2] for q in next(iter(self.rows.values()), []))

    def attention(self, keys: list[torch.Tensor], first_row: int, key_valid: torch.Tensor | None) -> Recording:
        """The sum over these rows of their softmax attention over other keys (per layer [B, Hkv, Tk, D]), the
        rows standing at storage index first_row.. of those keys (first_row = Tk: after all of them)."""
        rec = Recording(rows=-1)
        for layer in sorted(self.rows):
            q = torch.cat(self.rows[layer], dim=2)
            scaling, window, softcap = self.how[layer]
            rec.add(layer, row_attention(q, keys[layer], scaling, first_row, key_valid, window, softcap), q.shape[2])
        return rec


_QUERIES: contextvars.ContextVar[Queries | None] = contextvars.ContextVar("lookaheadkv_queries", default=None)


@contextlib.contextmanager
def capture_queries() -> Iterator[Queries]:
    """Keep the query rows of every attention call of our attention function inside this block."""
    q = Queries()
    token = _QUERIES.set(q)
    try:
        yield q
    finally:
        _QUERIES.reset(token)


_CACHE: contextvars.ContextVar = contextvars.ContextVar("lookaheadkv_cache", default=None)


@contextlib.contextmanager
def active_cache(cache) -> Iterator[None]:
    """Within this block our attention asks `cache` (an EvictableCache) for each layer's mask once the cache
    is evicted; other caches are left to transformers' own masks."""
    token = _CACHE.set(cache)
    try:
        yield
    finally:
        _CACHE.reset(token)


def current_cache():
    """The cache of the forward call running now under active_cache (None outside one)."""
    return _CACHE.get()


def cache_mask(module, query: torch.Tensor) -> torch.Tensor | None:
    """The active evicted cache's mask for this layer's call, or None (transformers' mask stands)."""
    cache = _CACHE.get()
    if cache is None or not hasattr(cache, "attention_mask"):
        return None
    return cache.attention_mask(module.layer_idx, query.shape[1])


def lookaheadkv_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    state = _STATE.get()
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    captured = _QUERIES.get()
    if captured is not None:
        captured.add(module.layer_idx, query, module.scaling if scaling is None else scaling, window, softcap)
    evicted_mask = cache_mask(module, query)
    if state is not None:
        scaling = module.scaling if scaling is None else scaling
        valid = None if state.key_valid is None else state.key_valid[module.layer_idx]
        if valid is not None and valid.device != key.device:  # layers spread over devices (a device map)
            valid = valid.to(key.device)
        if valid is not None and valid.shape[-1] < key.shape[2]:
            # Keys appended after the mask was made (draft, lookahead or answer rows) are real tokens. Made
            # whole here, once, for both the recording and the mask (the fused kernel reads exactly Tk flags).
            valid = F.pad(valid, (0, key.shape[2] - valid.shape[-1]), value=True)
        records = state.record if isinstance(state.record, list) else [state.record] if state.record else []
        if records and evicted_mask is None and _fusable(module, query, key, records, kwargs):
            rec = records[0]
            out, total = attend_and_record(query, key, value, scaling, valid)
            rec.add(module.layer_idx, total if rec.grad else total.detach(), query.shape[2])
            return out, None
        if (records and valid is None and evicted_mask is None and attention_mask is None and window is None
                and softcap is None and not kwargs.get("dropout") and query.shape[2] == key.shape[2] > 1):
            out = prompt_attention(module, query, key, value, scaling, records)
            if out is not None:
                return out, None
        if valid is not None and evicted_mask is None:
            attention_mask = storage_mask(valid, query.shape[2], key.shape[2], window=window)
        for rec in records:
            with torch.set_grad_enabled(rec.grad and torch.is_grad_enabled()):
                _record(rec, module, query, key, scaling, valid, window, softcap)
    if evicted_mask is not None:
        attention_mask = evicted_mask
    if softcap is not None:
        scaling = module.scaling if scaling is None else scaling
        return softcapped_attention(module, query, key, value, attention_mask, scaling, softcap)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, lookaheadkv_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def install(model):
    """Switch a loaded transformers model to our attention function (same math as SDPA)."""
    model.set_attn_implementation(NAME)
    return model
