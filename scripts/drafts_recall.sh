#!/usr/bin/env bash
# Importance recall of LAQ and SpecKV vs SnapKV on held-out prompts (results/drafts/). CPU, one thread each,
# niced so the shared machine stays usable. Usage: bash scripts/drafts_recall.sh smollm2|qwen
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
smollm2)
  nice -n 10 lookaheadkv recall --model smollm2-135m-instruct \
    --methods "snapkv,snapkv:window=16,laq:reuse_draft=true,laq:window=16:reuse_draft=true,laq:window=16:k=32:reuse_draft=true" \
    --budgets 32,64,128,256 --samples 50 --min-tokens 1000 --max-tokens 2000 --response-tokens 96 \
    --threads 1 --seed 0 --out results/drafts/smollm2-135m ;;
qwen)
  nice -n 10 lookaheadkv recall --model qwen2.5-coder-1.5b-instruct \
    --methods "snapkv,snapkv:window=16,laq:window=16:reuse_draft=true,speckv:window=16:reuse_draft=true:draft_model=qwen2.5-coder-0.5b-instruct" \
    --budgets 32,64,128,256 --samples 24 --min-tokens 800 --max-tokens 1200 --response-tokens 64 \
    --threads 1 --seed 0 --out results/drafts/qwen2.5-coder-1.5b ;;
*) echo "usage: $0 smollm2|qwen" >&2; exit 1 ;;
esac
