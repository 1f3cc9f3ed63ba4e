#!/usr/bin/env bash
# CPU rehearsal of a lease's pipelines at toy sizes: `bash scripts/gpu/rehearse_pipeline.sh [MODEL]` (default
# qwen2.5-coder-0.5b-instruct, fetched and converted here once). In a temporary LKV_DIR (printed): the converted
# model linked in as if staged, 8 training prompts of 100-300 tokens, one RULER sample at 1K; then start.sh with
# two lanes ("targets main bf16 cost eval" beside "compare"), wait_for.sh and collect_out.sh into $LKV_DIR/out,
# the way the GPU calls run them. Knobs as for pipeline.sh (e.g. COMPARE_METHODS=snapkv,laq).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
model=${1:-qwen2.5-coder-0.5b-instruct}
lkv() { python -c "from lookaheadkv.cli import main; main()" "$@"; }
src=$(lkv models fetch "$model" | tail -1)
export LKV_DIR=${LKV_DIR:-$(mktemp -d /tmp/lkv-pipeline.XXXXXX)}
export LOOKAHEADKV_HOME=$LKV_DIR/home
unset LKV_ENV
mkdir -p "$LOOKAHEADKV_HOME/models"
ln -sfn "$src" "$LOOKAHEADKV_HOME/models/$model"
tag=$model; [[ $model == qwen* ]] && tag=qwen
[ -f "$LKV_DIR/prompts_$tag.safetensors" ] || lkv prompts --model "$model" --samples 8 --min-tokens 100 --max-tokens 300 \
  --out "$LKV_DIR/prompts_$tag.safetensors" 2>/dev/null
lkv eval --model "$model" --tasks niah_single_1 --n 1 --length 1024 --samples "$LKV_DIR/eval_samples_q1k.jsonl.gz" \
  --only-samples 2>/dev/null
export DEVICE=cpu DTYPE=float32 P=$LKV_DIR/prompts_$tag.safetensors N_MAIN=8 CAP=8 BS=2 EVALS=1 EVAL_BATCH=1
export EVAL_PLAN="1024:niah_single_1:1:rehearsal_1k" EVAL_BUDGETS=64,128 SAMPLES="eval_samples_q1k.jsonl.gz"
export COMPARE_METHODS=${COMPARE_METHODS:-snapkv,laq} COST_CONTEXTS=512 COST_BUDGET=64 COST_REPEATS=1
export TARGETS_LIMIT=300 MAIN_LIMIT=300
export COST_METHODS=${COST_METHODS:-full,snapkv,lookahead} OUT=$LKV_DIR/out
echo "LKV_DIR=$LKV_DIR"
# device_setup.sh's environment without its parking: it would assemble and convert every model this checkout has
# staged in .gpu/ (the 1.5B's 1.1 GB on this CPU), and its "converting" status stopped this script under set -e
# (parking is rehearsed by scripts/gpu/rehearse_stage.sh)
export LKV_ENV=1 PYTHONUNBUFFERED=1
LEASE_LEFT=1500 bash scripts/gpu/start.sh "$model:targets,main,bf16,cost,eval;$model:compare"
bash scripts/gpu/start.sh "$model:targets,main,bf16,cost,eval;$model:compare"  # a later call: reports only
bash scripts/gpu/wait_for.sh "$model:eval" 1500 > /dev/null
bash scripts/gpu/wait_for.sh "$model:compare" 600
