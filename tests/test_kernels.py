"""The fused Triton row attention and decode attention equal the PyTorch path. Without a GPU they run in Triton's
CPU interpreter, in a subprocess, because the interpreter must be chosen before the kernels are defined."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHECK = r"""
import json, torch
from lookaheadkv import kernels
from lookaheadkv.attention import row_attention
from lookaheadkv.methods import get_method
from lookaheadkv.prefill import prefill
from tests.conftest import tiny_model, left_pad

dev = "cuda" if torch.cuda.is_available() else "cpu"
out = {"device": dev, "cases": []}
torch.manual_seed(0)
# (batch, q heads, kv heads, rows, keys, head dim, first row, with pad mask, dtype)
cases = [(2, 6, 2, 5, 70, 16, 60, True, torch.float32), (1, 4, 4, 1, 33, 64, 32, False, torch.float32),
         (2, 9, 3, 40, 130, 64, 90, True, torch.float32), (1, 4, 2, 3, 20, 24, 10, False, torch.float32),
         (1, 8, 2, 32, 300, 128, 268, False, torch.bfloat16)]
for b, hq, hkv, r, tk, d, first, pad, dtype in cases:
    q = torch.randn(b, hq, r + 7, d, device=dev).to(dtype)[:, :, 7:]  # a strided slice, as in the prefill
    k = torch.randn(b, hkv, tk, d, device=dev).to(dtype)
    valid = torch.rand(b, tk, device=dev) > 0.3 if pad else None
    assert kernels.available(q)
    got = kernels.row_attention(q, k, 0.125, first, valid)
    with kernels.disabled():
        ref = row_attention(q.float(), k.float(), 0.125, first, valid)  # the PyTorch path, on the same values
    out["cases"].append({"max_err": (got - ref).abs().max().item(), "sum": got.sum().item(), "rows": b * hq * r,
                         "dtype": str(dtype)})
# End to end: SnapKV on a left-padded batch, kernel vs PyTorch path. In bf16: our attention hands only
# half-precision rows to the kernel (kernels.pays), fp32 ones stay on cuBLAS.
probe, many = torch.zeros(1, 1, 8, 16, device=dev), torch.zeros(1, 1, 65, 16, device=dev)
out["pays"] = [kernels.pays(probe.bfloat16()), kernels.pays(probe), kernels.pays(many.bfloat16())]
model = tiny_model().to(torch.bfloat16).to(dev)
ids, mask = left_pad([torch.arange(5, 85) % 128, torch.arange(9, 60) % 128])
ids, mask = ids.to(dev), mask.to(dev)
snap = get_method("snapkv", window=8)
got = snap.scores(model, prefill(model, ids, mask, record_rows=8))
with kernels.disabled():
    ref = snap.scores(model, prefill(model, ids, mask, record_rows=8))
out["snapkv_max_err"] = max((a - b).abs().max().item() for a, b in zip(got, ref))
out["snapkv_same_top16"] = all(bool((a.topk(16).indices.sort().values == b.topk(16).indices.sort().values).all())
                               for a, b in zip(got, ref))
# Rows run after a padded prompt (draft, lookahead, answer rows): the prompt's pad flags are shorter than the
# keys; the appended keys are real tokens on both paths.
from lookaheadkv import attention
from lookaheadkv.prefill import attend_rows
pf = prefill(model, ids, mask)
extra = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]], device=dev)
got = attend_rows(model, pf, input_ids=extra).mean()
with kernels.disabled():
    ref = attend_rows(model, pf, input_ids=extra).mean()
out["after_prompt_max_err"] = max((a - b).abs().max().item() for a, b in zip(got, ref))
# Every row recorded (H2O) in chunks that skip the keys after each chunk's last row equals one whole chunk.
whole = prefill(model, ids, mask, record_rows=-1).recording.mean()
attention.ROW_CHUNK = 16
chunked = prefill(model, ids, mask, record_rows=-1).recording.mean()
out["chunked_max_err"] = max((a - b).abs().max().item() for a, b in zip(whole, chunked))
# The second pass alone, given each row's log-sum-exp (a prompt's own attention call returns it).
out["row_sums_max_err"] = 0.0
for b, hq, hkv, r, tk, d, first, dtype in [(2, 6, 2, 5, 70, 16, 65, torch.float32),
                                            (1, 8, 2, 32, 300, 128, 268, torch.bfloat16)]:
    q = torch.randn(b, hq, r + 3, d, device=dev).to(dtype)[:, :, 3:]
    k = torch.randn(b, hkv, tk, d, device=dev).to(dtype)
    logits = (q.float().reshape(b, hkv, -1, d) @ k.float().transpose(-1, -2)).view(b, hq, r, tk) * 0.125
    hidden = torch.arange(tk, device=dev)[None, :] > torch.arange(first, first + r, device=dev)[:, None]
    lse = logits.masked_fill(hidden, float("-inf")).logsumexp(-1)
    got = kernels.row_sums(q, k, 0.125, first, lse)
    with kernels.disabled():
        ref = row_attention(q.float(), k.float(), 0.125, first, None)
    out["row_sums_max_err"] = max(out["row_sums_max_err"], (got - ref).abs().max().item())
# End to end, unpadded: the prompt's recording from the attention call's log-sum-exp vs the two-pass kernel.
import os
one = ids[:1]
got = snap.scores(model, prefill(model, one, record_rows=8))
os.environ["LOOKAHEADKV_NO_SDPA_LSE"] = "1"
ref = snap.scores(model, prefill(model, one, record_rows=8))
out["lse_snapkv_max_err"] = max((a - b).abs().max().item() for a, b in zip(got, ref))
print(json.dumps(out))
"""


def run_check(script: str) -> dict:
    """The script's last printed line (JSON), run in Triton's CPU interpreter (LKV_TEST_CUDA=1: on the GPU)."""
    env = dict(os.environ, TRITON_INTERPRET="0" if os.environ.get("LKV_TEST_CUDA") else "1")
    env.pop("LOOKAHEADKV_NO_TRITON", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fused_row_attention_equals_pytorch_path():
    out = run_check(CHECK)
    for case in out["cases"]:
        # every row's softmax sums to 1, so the row sums add up to the number of rows
        assert abs(case["sum"] - case["rows"]) < 1e-2 * case["rows"] ** 0.5, case
        assert case["max_err"] < 1e-5, case  # bf16 products are exact in the kernel's tf32 dot
    assert out["snapkv_max_err"] < 1e-5
    assert out["snapkv_same_top16"]
    assert out["pays"] == [True, False, False]  # bf16 rows: kernel; fp32 or more than 64 rows: PyTorch
    assert out["after_prompt_max_err"] < 1e-5
    assert out["chunked_max_err"] < 1e-5
    assert out["row_sums_max_err"] < 1e-5
    assert out["lse_snapkv_max_err"] < 1e-4  # the normaliser from the attention kernel in bf16's arithmetic


DECODE = r"""
import json, torch
from lookaheadkv import kernels
from lookaheadkv.attention import attend_and_record
from lookaheadkv.collect import collect_batch
from tests.conftest import tiny_model

dev = "cuda" if torch.cuda.is_available() else "cpu"
out = {"cases": []}
torch.manual_seed(0)
# (batch, q heads, kv heads, keys, head dim, left pads per sequence or None, dtype); one whole key block of pads
cases = [(3, 9, 3, 300, 64, [0, 140, 5], torch.float32), (1, 4, 4, 70, 16, None, torch.float32),
         (3, 7, 1, 257, 16, None, torch.float32), (3, 14, 2, 257, 16, [3, 0, 100], torch.bfloat16),
         (1, 6, 2, 70, 64, [9], torch.bfloat16)]
for b, hq, hkv, tk, d, pads, dtype in cases:
    # keys and values: the filled part of a larger buffer; the query: a strided slice
    kbuf, vbuf = (torch.randn(b, hkv, tk + 30, d, device=dev).to(dtype) for _ in range(2))
    k, v = kbuf[:, :, :tk], vbuf[:, :, :tk]
    q = torch.randn(b, hq, 3, d, device=dev).to(dtype)[:, :, 1:2]
    valid = None
    if pads is not None:
        valid = torch.ones(b, tk + 30, dtype=torch.bool, device=dev)[:, :tk]
        for i, n in enumerate(pads):
            valid[i, :n] = False
    o, p = kernels.decode_attention(q, k, v, 0.125, valid)
    with kernels.disabled():
        ro, rp = attend_and_record(q.float(), k.float(), v.float(), 0.125, valid)  # the PyTorch path, same values
    err = (o.float() - ro).abs()
    hidden = torch.zeros_like(p, dtype=torch.bool) if valid is None else ~valid[:, None].expand_as(p)
    out["cases"].append({"dtype": str(dtype), "shape": list(o.shape), "ref_shape": list(ro.shape),
                         "out_dtype": str(o.dtype), "probs_err": (p - rp).abs().max().item(),
                         "out_err": err.max().item(), "out_rel": (err - 2 ** -7 * ro.abs()).max().item(),
                         "sum_err": (p.sum(-1) - 1).abs().max().item(),
                         "hidden_max": p[hidden].abs().max().item() if hidden.any() else 0.0})
# A sequence with no valid key (never in the collector): NaN, as the PyTorch path gives
q, k = torch.randn(2, 4, 1, 16, device=dev), torch.randn(2, 2, 20, 16, device=dev)
none = torch.ones(2, 20, dtype=torch.bool, device=dev)
none[1] = False
o, p = kernels.decode_attention(q, k, k, 0.125, none)
with kernels.disabled():
    ro, rp = attend_and_record(q, k, k, 0.125, none)
out["no_key_nan"] = [bool(o[1].isnan().all()), bool(ro[1].isnan().all()), bool(o[0].isfinite().all())]
# End to end: the collector's decode steps on the kernel (a bf16 model: kernels.pays) vs the PyTorch path
calls, fused = [0], kernels.decode_attention
def counted(*args):
    calls[0] += 1
    return fused(*args)
kernels.decode_attention = counted
model = tiny_model().to(torch.bfloat16).to(dev)
prompts = [torch.arange(5, 45) % 128, torch.arange(9, 30) % 128, (torch.arange(70) * 7) % 128]
got = collect_batch(model, [x.to(dev) for x in prompts], 6, set())
with kernels.disabled():
    ref = collect_batch(model, [x.to(dev) for x in prompts], 6, set())
out["same_responses"] = all(torch.equal(a.response, b.response) for a, b in zip(got, ref))
out["responses"] = [len(a.response) for a in got]
out["truth_err"] = max((a.truth - b.truth).abs().max().item() for a, b in zip(got, ref))
out["kernel_calls"] = calls[0]
print(json.dumps(out))
"""


def test_fused_decode_attention_equals_pytorch_path():
    out = run_check(DECODE)
    for case in out["cases"]:
        assert case["shape"] == case["ref_shape"] and case["sum_err"] < 1e-5 and case["hidden_max"] == 0.0, case
        if case["dtype"] == "torch.float32":
            assert case["probs_err"] <= 1e-6 and case["out_err"] <= 1e-5, case
        else:  # the output takes one rounding to bf16 (the interpreter truncates: up to one ulp, 2**-7)
            assert case["out_dtype"] == "torch.bfloat16" and case["probs_err"] <= 1e-5 and case["out_rel"] <= 1e-6, case
    assert out["no_key_nan"] == [True, True, True]
    assert out["same_responses"] and out["responses"] == [6, 6, 6]
    assert out["truth_err"] <= 1e-3
    assert out["kernel_calls"] == 3 * 6  # every layer's every decode step took the kernel, and only with it on
