#!/usr/bin/env bash
# GPU side of the speed and memory benchmark (issue 6): `bash scripts/gpu/bench.sh MODE...` runs the modes in
# turn (kernel, main, contexts, qwen3, smollm2; see below), each under its own time limit, e.g.
#   call A (right after the evaluation's calls, the default model converted there):
#     source scripts/gpu/device_setup.sh; bash scripts/gpu/bench.sh kernel main smollm2
#   call B: source scripts/gpu/device_setup.sh; bash scripts/gpu/bench.sh contexts qwen3
# Random-weight shapes need nothing carried; smollm2 needs the default model converted on the machine
# (scripts/gpu/device_setup.sh with the model's chunks carried, as scripts/gpu/stage.sh smollm2 plans them).
# Only the JSON files come back ($OUT/<run>.json, at most 8 files a call); on the CPU,
# `python -m lookaheadkv.bench.report results/bench/<run>/bench.json` writes bench.md and the plots beside each.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
bench() {  # bench NAME ARGS...: one benchmark, its JSON to $OUT/NAME.json, its tables on stdout
  local name=$1; shift
  timeout "${LIMIT:-400}" python3 -m lookaheadkv.bench --device cuda --dtype bfloat16 --out "/tmp/bench/$name" "$@" 2> "/tmp/bench/$name.err" \
    | tail -60
  cp "/tmp/bench/$name/bench.json" "$OUT/$name.json"
  tail -c 3000 "/tmp/bench/$name.err" | tr '\r' '\n' | grep -v '^bench: ' | tail -15  # errors, if any
}
mkdir -p /tmp/bench
for mode in "${@:-main}"; do
case "$mode" in
  kernel)  # the fused row-attention kernel against the PyTorch path, on this GPU (bf16 and fp32)
    LKV_TEST_CUDA=1 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -5 \
      | tee "$OUT/kernel.txt"
    ;;
  main)  # Llama-3.1-8B shape at 32K: TTFT of every method (5 paired repeats) + decode at batch 1, 8, 16
    LIMIT=${LIMIT_MAIN:-260} bench llama31_8b_32k --model llama-3.1-8b --contexts 32768 \
      --methods full,snapkv,pyramidkv,lookahead,laq:k=8,speckv:k=32 --budget 1024 \
      --decode-budgets 256,1024 --decode-batches 1,8,16 --repeats 5
    ;;
  contexts)  # Llama-3.1-8B shape: the cheap methods and LAQ at 8K, 16K and 64K (TTFT only)
    LIMIT=${LIMIT_CONTEXTS:-200} bench llama31_8b_ctx --model llama-3.1-8b --contexts 8192,16384,65536 \
      --methods full,snapkv,pyramidkv,lookahead,laq:k=8 --budget 1024 --decode-batches "" --repeats 3
    ;;
  qwen3)  # Qwen3-8B shape at 32K: TTFT + decode at batch 1 and 16
    LIMIT=${LIMIT_QWEN3:-150} bench qwen3_8b --model qwen3-8b --contexts 32768 \
      --methods full,snapkv,pyramidkv,lookahead,laq:k=8 --budget 1024 --decode-budgets 1024 \
      --decode-batches 1,16 --repeats 3
    ;;
  smollm2)  # the default model with its real weights (needs the converted model: device_setup.sh)
    LIMIT=${LIMIT_SMOLLM2:-100} bench smollm2 --model smollm2-135m-instruct --contexts 2048,4096,8000 \
      --methods full,snapkv,pyramidkv,lookahead,laq:k=8 --budget 256 --decode-context 8000 \
      --decode-budgets 256,1024 --decode-batches 1,16 --repeats 3
    ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
done
