"""Fused row attention (Triton): for a few query rows, the sum over rows of softmax(q k^T) per query head,
without writing the [rows x keys] fp32 logits to memory.

The PyTorch path (attention.row_attention) writes those logits, then reads and writes them again for the
softmax and the row sum: at 32K keys that is ~0.5 ms a layer on the H200, most of SnapKV's eviction cost.
Here each of two passes reads the keys once:
1. per (query head, row block, key block): each row's max and sum of exp over the block; the host combines
   these partials into each row's log-sum-exp (a tensor of heads x blocks x rows);
2. per (query head, key block): the sum over rows of exp(s - lse).
Query heads are grouped onto their KV head by index (no repeat_kv copies). Used for inference on CUDA;
the PyTorch path stays for CPU and for training (it needs the autograd graph). Set LOOKAHEADKV_NO_TRITON=1
to force the PyTorch path everywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

BLOCK_R, BLOCK_N = 32, 64
FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # float64 (the tests' tiny models) stays on PyTorch


def available(query: torch.Tensor) -> bool:
    """Whether the fused kernel serves this call: Triton present, a CUDA tensor (or Triton's CPU
    interpreter, for the tests), and not switched off."""
    if triton is None or os.environ.get("LOOKAHEADKV_NO_TRITON") == "1" or query.dtype not in FLOATS:
        return False
    return query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def disabled():
    """The PyTorch path inside this block (to time or check the two against each other)."""
    old = os.environ.get("LOOKAHEADKV_NO_TRITON")
    os.environ["LOOKAHEADKV_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOOKAHEADKV_NO_TRITON"]
        else:
            os.environ["LOOKAHEADKV_NO_TRITON"] = old


if triton is not None:

    @triton.jit
    def _scores(q_ptr, k_ptr, valid_ptr, b, h, kv, rows, keys, n_rows, n_keys, first_row, scaling,
                sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b,
                HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
        """[rows x keys] scaled logits, -inf where a row may not see a key (causal in storage order, pad
        keys hidden, each row always sees itself); rows past n_rows are fully hidden."""
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_r + d[None, :],
                    mask=(rows[:, None] < n_rows) & (d[None, :] < D), other=0.0)
        k = tl.load(k_ptr + b * sk_b + kv * sk_h + keys[:, None] * sk_t + d[None, :],
                    mask=(keys[:, None] < n_keys) & (d[None, :] < D), other=0.0)
        # bf16/fp16 values are exact in tf32, so the tf32 product of the upcast tiles is exact (fp32 sums)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scaling
        own = first_row + rows[:, None]
        visible = keys[None, :] <= own
        if HAS_VALID:
            v = tl.load(valid_ptr + b * sv_b + keys, mask=keys < n_keys, other=0)
            visible = (visible & (v[None, :] != 0)) | (keys[None, :] == own)
        visible = visible & (keys[None, :] < n_keys) & (rows[:, None] < n_rows)
        return tl.where(visible, s, float("-inf"))

    @triton.jit
    def _partials(q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr, heads_q, group, n_rows, n_keys, first_row, scaling,
                  sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, n_blocks,
                  HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
        bh, rb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // heads_q, bh % heads_q
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _scores(q_ptr, k_ptr, valid_ptr, b, h, h // group, rows, keys, n_rows, n_keys, first_row, scaling,
                    sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, HAS_VALID, PRECISION, BLOCK_D, D)
        m = tl.max(s, axis=1)
        l_sum = tl.sum(tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), axis=1)
        out = (bh * n_blocks + nb) * n_rows + rows
        tl.store(m_ptr + out, m, mask=rows < n_rows)
        tl.store(l_ptr + out, l_sum, mask=rows < n_rows)

    @triton.jit
    def _row_sums(q_ptr, k_ptr, valid_ptr, lse_ptr, out_ptr, heads_q, group, n_rows, n_keys, first_row, scaling,
                  sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b,
                  HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, ROW_BLOCKS: tl.constexpr):
        bh, nb = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads_q, bh % heads_q
        keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for rb in tl.static_range(ROW_BLOCKS):
            rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            s = _scores(q_ptr, k_ptr, valid_ptr, b, h, h // group, rows, keys, n_rows, n_keys, first_row,
                        scaling, sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, HAS_VALID, PRECISION, BLOCK_D, D)
            lse = tl.load(lse_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
            acc += tl.sum(tl.exp(s - lse[:, None]), axis=0)
        tl.store(out_ptr + bh * n_keys + keys, acc, mask=keys < n_keys)


def row_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    """Same contract as attention.row_attention (inference only): [B, Hq, Tk] fp32, the sum over the query
    rows [B, Hq, R, D] (storage index first_row..) of their softmax attention over keys [B, Hkv, Tk, D]."""
    b, hq, r, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key.to(query.dtype) if key.stride(-1) == 1 else key.to(query.dtype).contiguous()
    n_blocks = triton.cdiv(tk, BLOCK_N)
    row_blocks = triton.cdiv(r, BLOCK_R)
    m = torch.empty((b * hq, n_blocks, r), device=query.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    valid = key_valid.view(torch.uint8) if key_valid is not None else query  # unused when HAS_VALID is False
    sv_b = key_valid.stride(0) if key_valid is not None else 0
    common = dict(HAS_VALID=key_valid is not None, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                  BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)), D=d)
    strides = (*query.stride()[:3], *key.stride()[:3], sv_b)
    _partials[(b * hq, row_blocks, n_blocks)](query, key, valid, m, l_sum, hq, hq // hkv, r, tk, first_row,
                                              scaling, *strides, n_blocks, **common)
    top = m.amax(dim=1, keepdim=True)
    lse = (top + (l_sum * (m - top).exp()).sum(dim=1, keepdim=True).log()).squeeze(1).contiguous()
    out = torch.empty((b, hq, tk), device=query.device, dtype=torch.float32)
    _row_sums[(b * hq, n_blocks)](query, key, valid, lse, out, hq, hq // hkv, r, tk, first_row, scaling,
                                  *strides, ROW_BLOCKS=row_blocks, **common)
    return out
