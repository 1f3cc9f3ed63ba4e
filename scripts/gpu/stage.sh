#!/usr/bin/env bash
# CPU side, once per plan: `bash scripts/gpu/stage.sh [smollm2|qwen]` puts what the GPU machine lacks into ignored
# folders that the device tool's `run` can carry, then prints the calls (.gpu/calls-PLAN.txt): each carries at most
# 64 MiB with the tree (scripts/gpu/plan_calls.py). Deterministic (seed 0; bench prompts 1); a rerun redoes nothing.
#   .whl/  the gguf wheel (the GPU image has no gguf package)
#   .gpu/MODEL/  the model's GGUF in chunks + chunks.sha256 (scripts/gpu/stage_model.sh)
#   smollm2: the 24K training prompts and the benchmark's prompts (token ids, xz), the evaluation's samples (RULER
#            4K + QA + fidelity, RULER 8K) and the 200 held-out test-split samples of scripts/lookahead_eval.py
#   qwen:    both Qwen2.5-Coder models (1.5B first: its calls come first), N_PROMPTS (8000) training prompts of
#            300-16000 tokens with their tokenizer (prompts_qwen), samples of RULER 4K + QA (50 a task), 8K (50),
#            16K (25); the held-out samples as above
# Then, in the device session (each call within 30 s of the last, all with the same command until the results):
#   every call: run(carry=<a line of .gpu/calls-PLAN.txt>,
#                   command="source scripts/gpu/device_setup.sh; LEASE_LEFT=<s> bash scripts/gpu/start.sh PLAN")
#     (the first call starts the lanes, which wait for their models; later calls only report; LEASE_LEFT is
#     read once: the seconds from then until the results must be collected)
#   then: run(command="bash scripts/gpu/wait_for.sh MODEL:STAGE 540") as often as the lease allows; each brings
#     back what is done (scripts/gpu/collect_out.sh: status, results, rows, modules).
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate 2>/dev/null || true  # or the caller's environment
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
plan=${1:-smollm2}
lkv() { python -c "from lookaheadkv.cli import main; main()" "$@"; }
mkdir -p .whl .gpu
[ -n "$(ls .whl/gguf-*.whl 2>/dev/null)" ] || python -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
xz_of() { [ -f "$1.xz" ] || xz -k -T2 -6 "$1"; }
[ -f .gpu/heldout_200.json ] || python scripts/lookahead_eval.py --samples 200 --min-tokens 1000 --max-tokens 3000 \
  --samples-file .gpu/heldout_200.json --only-samples
case "$plan" in
  smollm2)
    models=(smollm2-135m-instruct)
    [ -f .gpu/prompts_24k.safetensors ] || lkv prompts --samples 24000 --min-tokens 300 --max-tokens 7400 \
      --out .gpu/prompts_24k.safetensors
    [ -f .gpu/prompts_bench.safetensors ] || lkv prompts --samples 2048 --min-tokens 1000 --max-tokens 3000 \
      --seed 1 --out .gpu/prompts_bench.safetensors
    xz_of .gpu/prompts_24k.safetensors; xz_of .gpu/prompts_bench.safetensors
    [ -f .gpu/eval_samples_4k.jsonl.gz ] || lkv eval --tasks ruler,qa,fidelity --n 50 --length 4096 \
      --samples .gpu/eval_samples_4k.jsonl.gz --only-samples
    [ -f .gpu/eval_samples_8k.jsonl.gz ] || lkv eval --tasks ruler --n 50 --length 8192 \
      --samples .gpu/eval_samples_8k.jsonl.gz --only-samples
    extra=(.gpu/prompts_24k.safetensors.xz .gpu/prompts_bench.safetensors.xz .gpu/eval_samples_4k.jsonl.gz
           .gpu/eval_samples_8k.jsonl.gz .gpu/heldout_200.json) ;;
  qwen)
    models=(qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct)
    tok=qwen2.5-coder-0.5b-instruct  # one tokenizer for both (SpecKV's pair), the smaller model to load
    [ -f .gpu/prompts_qwen.safetensors ] || lkv prompts --model "$tok" --samples "${N_PROMPTS:-8000}" \
      --min-tokens 300 --max-tokens 16000 --out .gpu/prompts_qwen.safetensors
    xz_of .gpu/prompts_qwen.safetensors
    [ -f .gpu/eval_samples_q4k.jsonl.gz ] || lkv eval --model "$tok" --tasks ruler,qa --n 50 --length 4096 \
      --samples .gpu/eval_samples_q4k.jsonl.gz --only-samples
    [ -f .gpu/eval_samples_q8k.jsonl.gz ] || lkv eval --model "$tok" --tasks ruler --n 50 --length 8192 \
      --samples .gpu/eval_samples_q8k.jsonl.gz --only-samples
    [ -f .gpu/eval_samples_q16k.jsonl.gz ] || lkv eval --model "$tok" --tasks ruler --n 25 --length 16384 \
      --samples .gpu/eval_samples_q16k.jsonl.gz --only-samples
    extra=(.gpu/prompts_qwen.safetensors.xz .gpu/eval_samples_q4k.jsonl.gz .gpu/eval_samples_q8k.jsonl.gz
           .gpu/eval_samples_q16k.jsonl.gz .gpu/heldout_200.json) ;;
  *) echo "usage: stage.sh smollm2|qwen" >&2; exit 2 ;;
esac
bash scripts/gpu/stage_model.sh split "${models[@]}"
# The first model's chunks and the files its pipeline needs come first, then the next model's
bash scripts/gpu/stage_model.sh plan "${models[0]}" -- "${extra[@]}" > ".gpu/calls-$plan.txt"
for m in "${models[@]:1}"; do bash scripts/gpu/stage_model.sh plan "$m" >> ".gpu/calls-$plan.txt"; done
echo "$(wc -l < ".gpu/calls-$plan.txt") calls in .gpu/calls-$plan.txt:"
cat ".gpu/calls-$plan.txt"
