#!/usr/bin/env bash
# GPU side of the speed and memory benchmark (issue 6), in two back-to-back `run` calls, each carrying one
# half of SmolLM2's GGUF (the default model's real weights; see scripts/gpu/device_setup.sh):
#   call 1: carry [".whl", ".gpu/smollm2.part0"]  source scripts/gpu/device_setup.sh; bash scripts/gpu/bench.sh 1
#   call 2: carry [".whl", ".gpu/smollm2.part1"]  source scripts/gpu/device_setup.sh; bash scripts/gpu/bench.sh decode
#   call 3: carry [".whl", ".gpu/smollm2.part2"]  source scripts/gpu/device_setup.sh; bash scripts/gpu/bench.sh 2
# and, any time (nothing carried): `export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; bash scripts/gpu/bench.sh decode`.
# Only the JSON files come back ($OUT/<run>.json, at most 8 files a call); on the CPU,
# `python -m lookaheadkv.bench.report results/bench/<run>/bench.json` writes bench.md and the plots beside each.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
ALL="full,snapkv,pyramidkv,lookahead,lookahead:passes=2,laq:k=8,speckv:k=32"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
bench() {  # bench NAME ARGS...: one benchmark, its JSON to $OUT/NAME.json, its tables on stdout
  local name=$1; shift
  timeout "${LIMIT:-400}" python3 -m lookaheadkv.bench --device cuda --dtype bfloat16 --out "/tmp/bench/$name" "$@" 2> "/tmp/bench/$name.err" \
    | tail -60
  cp "/tmp/bench/$name/bench.json" "$OUT/$name.json"
  tail -c 3000 "/tmp/bench/$name.err" | tr '\r' '\n' | grep -v '^bench: ' | tail -15  # errors, if any
}
mkdir -p /tmp/bench
case "${1:-1}" in
  1)  # Llama-3.1-8B shape: TTFT by stage, every method, 8K-32K (~4 min of device time)
    bench llama31_8b --model llama-3.1-8b --contexts 8192,16384,32768 --methods "$ALL" --budget 1024 \
      --decode-batches "" --repeats 3
    ;;
  decode)  # Llama-3.1-8B shape at 32K: TTFT of the cheap methods again + decode at batch 1, 8, 16 (~3 min)
    bench llama31_8b_32k --model llama-3.1-8b --contexts 32768 --methods full,snapkv,pyramidkv,lookahead,laq:k=8 \
      --budget 1024 --decode-budgets 256,1024 --decode-batches 1,8,16 --repeats 3
    ;;
  2)  # Qwen3-8B shape; then the default model with real weights (both GGUF halves arrived) and random ones
    bench qwen3_8b --model qwen3-8b --contexts 8192,16384,32768 --methods "$ALL" --budget 1024 \
      --decode-budgets 256,1024 --decode-batches 1,16 --repeats 2
    for w in "" "--random-weights"; do  # no smaller draft shares SmolLM2's tokenizer: no speckv here
      bench "smollm2${w:+_random}" --model smollm2-135m-instruct $w --contexts 2048,4096,8000 \
        --methods full,snapkv,pyramidkv,lookahead,lookahead:passes=2,laq:k=8 --budget 256 --decode-context 8000 \
        --decode-budgets 256,1024 --decode-batches 1,8,16 --repeats 3
    done
    ;;
esac
