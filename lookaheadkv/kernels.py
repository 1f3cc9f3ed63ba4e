"""Fused row attention (Triton): for a few query rows, the sum over rows of softmax(q k^T) per query head,
without writing the [rows x keys] fp32 logits to memory.

The PyTorch path (attention.row_attention) writes those logits, then reads and writes them again for the
softmax and the row sum: at 32K keys that is ~0.5 ms a layer on the H200, most of SnapKV's eviction cost.
Here each of two passes reads the keys once:
1. per (KV head, row block, key block): each row's max and sum of exp over the block; the host combines
   these partials into each row's log-sum-exp (a tensor of heads x blocks x rows);
2. per (KV head, key block): the sum over rows of exp(s - lse).
A program serves every query head of its KV head's group, so each key tile is read once (no repeat_kv).
Our attention uses it for inference on CUDA where it was measured to win (`pays`: half precision, at most
64 rows); the PyTorch path stays for the rest, the CPU and training (it needs the autograd graph). Set
LOOKAHEADKV_NO_TRITON=1 to force the PyTorch path everywhere.

`decode_attention` serves a decode step that records its row (the target collector): output and softmax row
of one query row per head, flash-decoding style, K and V read once (see its docstring).
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


MAX_ROWS = 64  # the glimpses it serves: a window, lookahead or draft rows


def pays(query: torch.Tensor) -> bool:
    """Whether our attention hands these rows to the kernel: where it was measured to win. Half-precision
    products on tensor cores, a few rows (SnapKV's 32 window rows at 32K: 6.4 ms vs 16.7 ms on the H200).
    Not fp32 (no tensor-core product in the kernel: cuBLAS wins, measured in the evaluation on the H200) and
    not every row (H2O: the PyTorch path's chunked products were ~6x faster there)."""
    return available(query) and query.dtype != torch.float32 and query.shape[2] <= MAX_ROWS


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
    def _scores(q_ptr, k, valid, b, h, rows, keys, n_rows, n_keys, first_row, scaling, sq_b, sq_h, sq_r,
                HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
                D: tl.constexpr):
        """[rows x keys] scaled logits of query head h against a loaded key tile, -inf where a row may not
        see a key (causal in storage order, pad keys hidden, each row always sees itself, rows past n_rows
        hidden). bf16/fp16 products are exact in the fp32 accumulator, so this equals the fp32 path."""
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_r + d[None, :],
                    mask=(rows[:, None] < n_rows) & (d[None, :] < D), other=0.0)
        if UPCAST:  # Triton's CPU interpreter has no bf16 product
            q = q.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        own = first_row + rows[:, None]
        visible = keys[None, :] <= own
        if HAS_VALID:
            visible = (visible & (valid[None, :] != 0)) | (keys[None, :] == own)
        visible = visible & (keys[None, :] < n_keys) & (rows[:, None] < n_rows)
        return tl.where(visible, s, float("-inf"))

    @triton.jit
    def _key_tile(k_ptr, valid_ptr, b, kv, keys, n_keys, sk_b, sk_h, sk_t, sv_b,
                  HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        k = tl.load(k_ptr + b * sk_b + kv * sk_h + keys[:, None] * sk_t + d[None, :],
                    mask=(keys[:, None] < n_keys) & (d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        valid = keys
        if HAS_VALID:
            valid = tl.load(valid_ptr + b * sv_b + keys, mask=keys < n_keys, other=0)
        return k, valid

    @triton.jit
    def _partials(q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr, heads_kv, n_rows, n_keys, first_row, scaling,
                  sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, n_blocks,
                  HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
        """Per (KV head, row block, key block): each row's max and sum of exp over the block, for every query
        head of the group (the key tile is read once for all of them)."""
        bkv, rb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, kv = bkv // heads_kv, bkv % heads_kv
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        k, valid = _key_tile(k_ptr, valid_ptr, b, kv, keys, n_keys, sk_b, sk_h, sk_t, sv_b, HAS_VALID, UPCAST,
                             BLOCK_D, D)
        for g in tl.static_range(GROUP):
            h = kv * GROUP + g
            s = _scores(q_ptr, k, valid, b, h, rows, keys, n_rows, n_keys, first_row, scaling, sq_b, sq_h, sq_r,
                        HAS_VALID, PRECISION, UPCAST, BLOCK_D, D)
            m = tl.max(s, axis=1)
            l_sum = tl.sum(tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), axis=1)
            out = ((b * heads_kv * GROUP + h) * n_blocks + nb) * n_rows + rows
            tl.store(m_ptr + out, m, mask=rows < n_rows)
            tl.store(l_ptr + out, l_sum, mask=rows < n_rows)

    @triton.jit
    def _row_sums(q_ptr, k_ptr, valid_ptr, lse_ptr, out_ptr, heads_kv, n_rows, n_keys, first_row, scaling,
                  sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b,
                  HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                  ROW_BLOCKS: tl.constexpr):
        """Per (KV head, key block): for each query head of the group, the sum over rows of exp(s - lse)."""
        bkv, nb = tl.program_id(0), tl.program_id(1)
        b, kv = bkv // heads_kv, bkv % heads_kv
        keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        k, valid = _key_tile(k_ptr, valid_ptr, b, kv, keys, n_keys, sk_b, sk_h, sk_t, sv_b, HAS_VALID, UPCAST,
                             BLOCK_D, D)
        for g in tl.static_range(GROUP):
            h = kv * GROUP + g
            bh = b * heads_kv * GROUP + h
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for rb in tl.static_range(ROW_BLOCKS):
                rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
                s = _scores(q_ptr, k, valid, b, h, rows, keys, n_rows, n_keys, first_row, scaling, sq_b, sq_h,
                            sq_r, HAS_VALID, PRECISION, UPCAST, BLOCK_D, D)
                lse = tl.load(lse_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
                acc += tl.sum(tl.exp(s - lse[:, None]), axis=0)
            tl.store(out_ptr + bh * n_keys + keys, acc, mask=keys < n_keys)


def row_sums(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int, lse: torch.Tensor
             ) -> torch.Tensor:
    """attention.row_sums on the kernel: the second pass alone, the rows' log-sum-exp [B, Hq, R] given (by the
    attention call), causal keys, no pads."""
    b, hq, r, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key.to(query.dtype)
    key = key if key.stride(-1) == 1 else key.contiguous()
    lse = lse.float().reshape(b * hq, r).contiguous()
    common = dict(HAS_VALID=False, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                  UPCAST=os.environ.get("TRITON_INTERPRET") == "1", GROUP=hq // hkv, BLOCK_R=BLOCK_R,
                  BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)), D=d)
    out = torch.empty((b, hq, tk), device=query.device, dtype=torch.float32)
    _row_sums[(b * hkv, triton.cdiv(tk, BLOCK_N))](query, key, query, lse, out, hkv, r, tk, first_row, scaling,
                                                   *query.stride()[:3], *key.stride()[:3], 0,
                                                   ROW_BLOCKS=triton.cdiv(r, BLOCK_R), **common)
    return out


def row_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, first_row: int,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    """Same contract as attention.row_attention (inference only): [B, Hq, Tk] fp32, the sum over the query
    rows [B, Hq, R, D] (storage index first_row..) of their softmax attention over keys [B, Hkv, Tk, D]."""
    b, hq, r, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if key_valid is not None and key_valid.shape[-1] != tk:  # the kernel reads exactly Tk flags a sequence
        raise ValueError(f"key_valid holds {key_valid.shape[-1]} flags for {tk} keys")
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key.to(query.dtype)
    key = key if key.stride(-1) == 1 else key.contiguous()
    n_blocks = triton.cdiv(tk, BLOCK_N)
    row_blocks = triton.cdiv(r, BLOCK_R)
    m = torch.empty((b * hq, n_blocks, r), device=query.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    valid = key_valid.view(torch.uint8) if key_valid is not None else query  # unused when HAS_VALID is False
    sv_b = key_valid.stride(0) if key_valid is not None else 0
    common = dict(HAS_VALID=key_valid is not None, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                  UPCAST=os.environ.get("TRITON_INTERPRET") == "1", GROUP=hq // hkv, BLOCK_R=BLOCK_R,
                  BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)), D=d)
    strides = (*query.stride()[:3], *key.stride()[:3], sv_b)
    # Triton launches on the current CUDA device: make it this layer's (layers spread over GPUs by a device map)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        _partials[(b * hkv, row_blocks, n_blocks)](query, key, valid, m, l_sum, hkv, r, tk, first_row, scaling,
                                                   *strides, n_blocks, **common)
        top = m.amax(dim=1, keepdim=True)
        lse = (top + (l_sum * (m - top).exp()).sum(dim=1, keepdim=True).log()).squeeze(1).contiguous()
        out = torch.empty((b, hq, tk), device=query.device, dtype=torch.float32)
        _row_sums[(b * hkv, n_blocks)](query, key, valid, lse, out, hkv, r, tk, first_row, scaling, *strides,
                                       ROW_BLOCKS=row_blocks, **common)
    return out


# Keys a decode program reads and its warps: the fastest of 32-256 x 1-8 on the H200 with SmolLM2's heads (B=1000
# x 1.5-3K keys, 360 x 8K: 0.64-1.3 ms, ~1.9 TB/s of K and V; the PyTorch path at B=1000 x 2000-2007 keys took
# 0.61 ms where Tk was a multiple of 8, 1.7-2.6 ms where not, the kernel 0.87 ms at all). Keys a combine
# iteration normalises, blocks it combines at once.
DECODE_BLOCK_N, DECODE_WARPS, COMBINE_BLOCK, COMBINE_BLOCKS = 128, 2, 1024, 64

if triton is not None:

    # n_keys and n_blocks change every step, the flags' row stride every batch: not specialised on (each new
    # value's divisibility by 16 would compile anew, seconds in a collection's batch)
    @triton.jit(do_not_specialize=["n_keys", "n_blocks", "sm_b"])
    def _decode_partials(q_ptr, k_ptr, v_ptr, valid_ptr, s_ptr, m_ptr, l_ptr, acc_ptr, heads_kv, n_keys, scaling,
                         sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, n_blocks,
                         HAS_VALID: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, D: tl.constexpr, BLOCK_DV: tl.constexpr, DV: tl.constexpr):
        """Per (KV head, key block), for every query head of the group (the K and V tiles read once): the raw
        scaled logits of its one row into s (-inf at pad keys), the block's max, sum of exp and exp-weighted V.
        One row is no tensor-core tile (16 rows at least): fp32 products on the CUDA cores, exact for bf16."""
        bkv, nb = tl.program_id(0), tl.program_id(1)
        b, kv = (bkv // heads_kv).to(tl.int64), bkv % heads_kv  # int64: a full buffer can pass 2**31 elements
        keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        k, valid = _key_tile(k_ptr, valid_ptr, b, kv, keys, n_keys, sk_b, sk_h, sk_t, sm_b, HAS_VALID, True,
                             BLOCK_D, D)
        v, _ = _key_tile(v_ptr, valid_ptr, b, kv, keys, n_keys, sv_b, sv_h, sv_t, sm_b, False, True, BLOCK_DV, DV)
        visible = keys < n_keys
        if HAS_VALID:
            visible = visible & (valid != 0)
        d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        for g in tl.static_range(GROUP):
            h = kv * GROUP + g
            bh = b * heads_kv * GROUP + h
            q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d < D, other=0.0).to(tl.float32)
            s = tl.where(visible, tl.sum(k * q[None, :], axis=1) * scaling, float("-inf"))
            tl.store(s_ptr + bh * n_keys + keys, s, mask=keys < n_keys)
            m = tl.max(s, axis=0)
            e = tl.exp(s - tl.where(m == float("-inf"), 0.0, m))  # a block of pads only: all 0
            tl.store(m_ptr + bh * n_blocks + nb, m)
            tl.store(l_ptr + bh * n_blocks + nb, tl.sum(e, axis=0))
            tl.store(acc_ptr + (bh * n_blocks + nb) * DV + dv, tl.sum(e[:, None] * v, axis=0), mask=dv < DV)

    @triton.jit(do_not_specialize=["n_keys", "n_blocks"])
    def _decode_combine(s_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, n_keys, n_blocks,
                        BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr):
        """Per query head: the log-sum-exp and output from the blocks' partials, then the logits in s turned
        into probabilities in place. No valid key at all gives NaN, as the softmax of the PyTorch path does."""
        bh = tl.program_id(0).to(tl.int64)
        c, dv = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_DV)
        top = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        for start in range(0, n_blocks, BLOCK_C):
            top = tl.maximum(top, tl.load(m_ptr + bh * n_blocks + start + c, mask=start + c < n_blocks,
                                          other=float("-inf")))
        mx = tl.max(top, axis=0)
        total = tl.zeros((BLOCK_C,), dtype=tl.float32)
        o = tl.zeros((BLOCK_DV,), dtype=tl.float32)
        for start in range(0, n_blocks, BLOCK_C):
            inside = start + c < n_blocks
            w = tl.exp(tl.load(m_ptr + bh * n_blocks + start + c, mask=inside, other=float("-inf")) - mx)
            total += w * tl.load(l_ptr + bh * n_blocks + start + c, mask=inside, other=0.0)
            acc = tl.load(acc_ptr + (bh * n_blocks + start + c[:, None]) * DV + dv[None, :],
                          mask=inside[:, None] & (dv[None, :] < DV), other=0.0)
            o += tl.sum(acc * w[:, None], axis=0)
        norm = tl.sum(total, axis=0)
        lse = mx + tl.log(norm)
        tl.store(out_ptr + bh * DV + dv, (o / norm).to(out_ptr.dtype.element_ty), mask=dv < DV)
        keys = tl.arange(0, BLOCK_K)
        for start in range(0, n_keys, BLOCK_K):
            at = s_ptr + bh * n_keys + start + keys
            tl.store(at, tl.exp(tl.load(at, mask=start + keys < n_keys, other=0.0) - lse), mask=start + keys < n_keys)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """attention.attend_and_record for one query row (a decode step; inference only): the output [B, 1, Hq, Dv]
    in value's dtype and the softmax row [B, Hq, Tk] fp32 (0 at keys where key_valid [B, Tk] is False), for
    query [B, Hq, 1, D] over key [B, Hkv, Tk, D] and value [B, Hkv, Tk, Dv] (views of a larger buffer: read
    through their strides, never copied).

    The PyTorch path takes five passes over [B, Hq, Tk] fp32 (a bf16 logits product into fp32, which cuBLAS
    hands to a slow MAGMA kernel on the H200, then the mask, the softmax, a cast and the V product). Here two
    launches: 1. per (KV head, key block), K and V read once for every query head of the group: raw logits
    into the output buffer and the block's max, sum of exp and exp-weighted V (flash decoding); 2. per query
    head: the log-sum-exp and output combined from those partials, and the logits turned into probabilities
    in place. fp32 throughout; the output takes one rounding to value's dtype (the PyTorch path also rounds
    the probabilities to it before the V product)."""
    b, hq, r, d = query.shape
    hkv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
    if r != 1:
        raise ValueError(f"decode_attention takes one query row, not {r}")
    if key_valid is not None and key_valid.shape[-1] != tk:  # the kernel reads exactly Tk flags a sequence
        raise ValueError(f"key_valid holds {key_valid.shape[-1]} flags for {tk} keys")
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    n_blocks = triton.cdiv(tk, DECODE_BLOCK_N)
    probs = torch.empty((b, hq, tk), device=query.device, dtype=torch.float32)
    m = torch.empty((b * hq, n_blocks), device=query.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty((b * hq, n_blocks, dv), device=query.device, dtype=torch.float32)
    out = torch.empty((b, 1, hq, dv), device=query.device, dtype=value.dtype)
    if key_valid is not None:
        key_valid = key_valid if key_valid.stride(-1) == 1 else key_valid.contiguous()
        valid, sm_b = key_valid.view(torch.uint8), key_valid.stride(0) if key_valid.shape[0] > 1 else 0
    else:
        valid, sm_b = query, 0  # unused when HAS_VALID is False
    block_dv = max(16, triton.next_power_of_2(dv))
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        _decode_partials[(b * hkv, n_blocks)](
            query, key, value, valid, probs, m, l_sum, acc, hkv, tk, scaling, query.stride(0), query.stride(1),
            *key.stride()[:3], *value.stride()[:3], sm_b, n_blocks, HAS_VALID=key_valid is not None,
            GROUP=hq // hkv, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)), D=d,
            BLOCK_DV=block_dv, DV=dv, num_warps=DECODE_WARPS)
        _decode_combine[(b * hq,)](probs, m, l_sum, acc, out, tk, n_blocks,
                                   BLOCK_C=COMBINE_BLOCKS, BLOCK_DV=block_dv, DV=dv, BLOCK_K=COMBINE_BLOCK)
    return out, probs
