#!/usr/bin/env bash
# GPU side: train the shipped lookahead module for smollm2-135m-instruct on one H200 and evaluate it on the
# held-out test split, in one call (the model's GGUF parts staged as in scripts/gpu/device_setup.sh: three calls, one part each).
#   call 1: carry [".whl", ".gpu/smollm2.part0"], command `source scripts/gpu/device_setup.sh; echo staged`
#   call 2: carry [".whl", ".gpu/smollm2.part1"], command `source scripts/gpu/device_setup.sh; echo staged`
#   call 3: carry [".whl", ".gpu/smollm2.part2"], command `bash scripts/gpu/train_smollm2.sh`
# Brings back under $OUT: module.tar (the module + train_log.json), train.log, eval/{summary.md,grid.md,rows.jsonl}.
# The time limits keep the call inside 10 minutes: collection and training stop early (logged) if slower.
set -euo pipefail
source scripts/gpu/device_setup.sh
OUT=${OUT:-/tmp/lkv/out}
M=/tmp/lkv/module
mkdir -p "$OUT/eval"
python3 -c "from lookaheadkv.models import fetch; print(fetch(\"smollm2-135m-instruct\"))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "from lookaheadkv.cli import main; main()" train --model smollm2-135m-instruct --out "$M" --device cuda \
  --samples 2400 --min-tokens 300 --max-tokens 3000 --response-tokens 256 --epochs 2 --batch-size 8 \
  --collect-batch-size 64 --collect-time-limit 180 --time-limit 120 --checkpoint-every 200 2>&1 \
  | tr '\r' '\n' | awk '!/it\/s|step\/s|batch\/s/ || NR % 50 == 0' | tee "$OUT/train.log"
tar cf "$OUT/module.tar" -C "$M" adapter_config.json adapter_model.safetensors lookahead_embeddings.safetensors \
  lookahead.json train_log.json
python3 scripts/lookahead_eval.py --model smollm2-135m-instruct --module "$M" --targets "$M/targets" \
  --samples 200 --min-tokens 1000 --max-tokens 3000 --budgets 32,64,128,256 \
  --methods lookahead,snapkv,pyramidkv,h2o,streamingllm --f1-methods lookahead,snapkv --f1-budgets 64,128 \
  --response-tokens 96 --answer-tokens 32 --batch-size 20 --device cuda --out "$OUT/eval" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|batch/s" | tail -80
