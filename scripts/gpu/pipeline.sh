#!/usr/bin/env bash
# One model's GPU work in stages: `MODEL=NAME [STAGES="a b& c"] bash scripts/gpu/pipeline.sh`, normally started by
# scripts/gpu/start.sh (a background job that outlives the calls; its header lists the calls of a lease).
# Every stage leaves $LKV_DIR/MODEL/results/STAGE.done (a rerun skips it), reads $LKV_DIR/knobs.env as it starts
# (change knobs on the way: `echo MAIN_LIMIT=200 >> /tmp/lkv/knobs.env`), and stops by what is left before
# $LKV_DIR/deadline (start.sh writes it: the lease's end less the time to bring the results back).
#
# Stages, in the order STAGES names them (NAME& runs in the background beside the stages after it):
#   bench    the trainer's benchmark (collection and training throughput, target forms) -> results/train/
#   targets  responses (cap CAP) + true importance for the first N_MAIN prompts of P, within TARGETS_LIMIT (its
#            batches spread over the lengths when it runs out: train.spread_order), and cap CAP2 for the first
#            N_ABL if an ablation trains on them
#   sweep    learning rate on the N_ABL subset (LRS, one epoch each, in parallel); the best by validation
#            recall@64 is main's LR (else LR)
#   main     the module on every prompt with a target (EPOCHS, BS, within MAIN_LIMIT: the schedule is fitted to
#            the time, so its decay completes), ABLATIONS beside it on the subset. A run its time limit still
#            stops (slower than its first steps) gives its last checkpoint (lookahead.json says so)
#   bf16     the module as shipped: bf16, its training cost (time, hardware, prompts) in lookahead.json
#   recall   importance recall and F1 on 200 held-out TEST-split prompts, module in fp32 and bf16
#   eval     `lookahead` with the new module on EVAL_PLAN's rounds (scripts/gpu/eval_rounds.py)
#   compare  the other methods (COMPARE_METHODS) on EVAL_PLAN; needs no module, so it runs while one trains
#   cost     `lookaheadkv bench` on the real weights: TTFT by stage of COST_METHODS at COST_CONTEXTS, the other
#            lanes' GPU processes paused meanwhile
#
# Profiles (defaults by MODEL; every one is a knob):
#   smollm2-135m-instruct: STAGES="bench targets sweep main bf16 eval& recall", 24K prompts up to 7.6K tokens
#     (prompts_24k), cap 512 (+256 for the subset), 7 ablations, eval of lookahead on RULER 4K/8K, QA, fidelity.
#   qwen2.5-coder-1.5b-instruct / -0.5b-instruct: STAGES="targets main bf16 cost eval" (start.sh runs `compare`
#     in a second job beside them), prompts up to 16K tokens (prompts_qwen), cap 512, no sweep or ablations
#     (LR 3e-3), EVAL_PLAN in rounds 4K/8K/16K x 10, then x 25, then x 50 (4K, 8K), budgets 64..1024; the
#     1.5B's SpecKV drafts with the 0.5B (k=32); the 0.5B's compare leaves SpecKV out.
#
# Time per stage on the H200, MEASURED on 2026-12-02 (results/eval/qwen2.5-coder-1.5b/COMMAND.md) with four jobs
# time-slicing the GPU (each ran at about a quarter of its speed alone: SmolLM2's training 0.29 steps/s against
# 1.20 alone), so a lane alone should do 2-4x better:
#   targets  1.5B: 4.2 prompts/s (cap 512, up to 16K tokens, 1M buffer tokens; alone 12.9), 0.5B 2.6; SmolLM2 37 (cap 256)
#   main     1.5B: 3.0 s/step at batch 16 (0.34 steps/s; alone 1.83 s/step on 2,714 prompts of up to 15.7K
#            tokens), 0.5B 4.3 s/step; the fitted schedule plans the steps the limit holds at its first 20 steps' speed
#   bf16     <1 min (load + save)
#   eval     1.5B lookahead, 5 budgets: round x10 of 4K+8K+16K (2,460 rows) in 383 s; round x25 beside the
#            compare lane only: 4K 1,260 rows in 92 s, 8K 1,170 in 115 s, 16K 1,080 in 236 s
#   compare  1.5B, six methods (SpecKV drafting with the 0.5B): round x10 (12,710 rows) in 971 s, 12-14 rows/s;
#            the whole plan (~62K rows) is several leases (rows resume from the committed files)
#   cost     1.5B, 4K/8K/16K x 5 methods + plain x 5 repeats, GPU alone: ~1 min (2026-12-02 19:15)
# Knobs: STAGES, P, N_MAIN, N_ABL, EPOCHS, BS, LR, LRS, MAIN_LRS, ABLATIONS, CAP, CAP2, TARGETS_LIMIT, MAIN_LIMIT, EVALS,
# TARGET_TOKENS (a collection batch's buffer tokens; default: half the free memory, which lanes side by side share),
# INIT (main starts from this module, e.g. `shipped`: the shipped module trained further on this lease's prompts),
# SAMPLES (a glob in $LKV_DIR), EVAL_PLAN, EVAL_BUDGETS, EVAL_METHODS, EVAL_BATCH, EVAL_LIMIT, COMPARE_METHODS,
# COMPARE_LIMIT, COST_CONTEXTS, COST_METHODS, COST_BUDGET, COST_REPEATS, COST_LIMIT, DTYPE; DRY=1 prints them and
# stops. A rehearsal on the CPU at toy sizes: scripts/gpu/rehearse_pipeline.sh (DEVICE=cpu, a temporary LKV_DIR).
set -uo pipefail
[ -n "${LKV_ENV:-}" ] || source scripts/gpu/device_setup.sh > /dev/null
CODE=${CODE:-$PWD}  # start.sh runs a snapshot of the code: each call lays the tree anew
export PYTHONPATH="$CODE:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
MODEL=${MODEL:-smollm2-135m-instruct}
D=$LKV_DIR DEVICE=${DEVICE:-cuda}
W=$D/$MODEL/work R=$D/$MODEL/results
DRAFT=qwen2.5-coder-0.5b-instruct
# The new module: found by identity in start.sh's snapshot once the bf16 stage put it there (rows and benchmark
# labelled plain `lookahead`), else by its path
LOOKAHEAD=lookahead; [ "$CODE" = "$D/code" ] || LOOKAHEAD=lookahead:module=$W/main_bf16
case "$MODEL" in
  smollm2-*)
    : "${STAGES:=bench targets sweep main bf16 eval& recall}" "${P:=$D/prompts_24k.safetensors}" "${N_MAIN:=24000}"
    : "${N_ABL:=4000}" "${EPOCHS:=1}" "${MAIN_LIMIT:=900}" "${EVAL_BUDGETS:=32,64,128,256,512}" "${DTYPE:=float32}"
    : "${EVAL_PLAN:=4096:ruler,qa:50:smollm2_4k;8192:ruler:25:smollm2_8k;4096:fidelity:50:smollm2_fidelity_4k}"
    : "${ABLATIONS=rank0:--rank 0|n8:--n 8|n16:--n 16|n64:--n 64|rank4:--rank 4|rank16:--rank 16|cap:--response-tokens ${CAP2:-256}}"
    : "${EVAL_BATCH:=50}" "${EVAL_LIMIT:=600}" "${EVALS:=8}" "${SAMPLES:=eval_samples_[0-9]*k.jsonl.gz}" ;;
  qwen2.5-coder-*)
    tag=${MODEL#qwen2.5-coder-}; tag=${tag%%b-*}; tag=q${tag//./}  # q15, q05: the rows' file names
    : "${STAGES:=targets main bf16 cost eval}" "${P:=$D/prompts_qwen.safetensors}" "${N_MAIN:=8000}" "${N_ABL:=1000}"
    : "${EPOCHS:=2}" "${TARGETS_LIMIT:=360}" "${MAIN_LIMIT:=240}" "${EVAL_BUDGETS:=64,128,256,512,1024}"
    : "${DTYPE:=bfloat16}" "${ABLATIONS=}" "${EVAL_BATCH:=25}" "${EVAL_LIMIT:=480}" "${COMPARE_LIMIT:=1500}"
    r="" ; for n in 10 25 50; do for l in 4096 8192 16384; do
      [ "$l" = 16384 ] && [ "$n" = 50 ] && continue  # 25 at 16K (the issue: >= 25)
      t=ruler; [ "$l" = 4096 ] && t=ruler,qa
      r="$r$l:$t:$n:${tag}_$(( l / 1024 ))k;"
    done; done
    : "${EVAL_PLAN:=$r}" "${SAMPLES:=eval_samples_q*.jsonl.gz}"
    spec="" cost_spec=""  # the 0.5B drafts for the 1.5B (one tokenizer); nothing smaller drafts for the 0.5B
    [ "$MODEL" != "$DRAFT" ] && spec=",speckv:k=32:draft_model=$DRAFT" cost_spec=",speckv:k=32"
    : "${COMPARE_METHODS:=snapkv,pyramidkv,streamingllm,tova,laq$spec}"
    : "${COST_METHODS:=full,snapkv,$LOOKAHEAD,laq:k=8$cost_spec}"
    : "${COST_CONTEXTS:=4096,8192,16384}" ;;
  *) : "${STAGES:=targets main bf16}" "${P:=$D/prompts.safetensors}" "${N_MAIN:=2000}" ;;
esac
: "${N_ABL:=4000}" "${EPOCHS:=1}" "${BS:=16}" "${LR:=3e-3}" "${LRS:=1e-3 3e-3 1e-2}" "${CAP:=512}" "${CAP2:=256}"
: "${BENCH_P:=$D/prompts_bench.safetensors}" "${BENCH_CAP:=256}" "${RECALL_N:=200}" "${EVALS:=4}"
: "${EVAL_METHODS:=$LOOKAHEAD}" "${EVAL_LIMIT:=600}" "${COMPARE_LIMIT:=600}" "${COST_LIMIT:=300}"
: "${COMPARE_METHODS:=}" "${COST_METHODS:=full,snapkv,$LOOKAHEAD,laq:k=8}" "${ABLATIONS=}"
: "${COST_CONTEXTS:=4096,8192}" "${DTYPE:=bfloat16}" "${EVAL_BATCH:=25}" "${EVAL_PLAN:=}"
if [ "${DRY:-0}" = 1 ]; then  # the resolved plan alone (tests, and a look before a lease)
  for v in MODEL STAGES P N_MAIN CAP EPOCHS LR TARGETS_LIMIT MAIN_LIMIT EVAL_PLAN EVAL_BUDGETS EVAL_METHODS \
           COMPARE_METHODS COST_METHODS COST_CONTEXTS DTYPE SAMPLES ABLATIONS; do echo "$v=${!v:-}"; done
  exit 0
fi
# The target stores (fp16 truth: ~15 GB for 8K Qwen-1.5B prompts of ~3.9K tokens) go to shared memory when it has
# room: no disk in the way of the collection's writes, and parallel runs read one copy.
T=$W
avail=$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)
[ -n "$avail" ] && [ "$avail" -gt 50000000 ] && T=/dev/shm/lkv/$MODEL
mkdir -p "$W" "$R" "$T"
df -h /tmp /dev/shm > "$R/disk.txt" 2>&1
export TQDM_MININTERVAL=15
lkv() { python3 -c "from lookaheadkv.cli import main; main()" "$@"; }
bars() { tr '\r' '\n' | awk '/%\|/ { last = $0; next } { print } END { if (last) print last }'; }  # one bar line
logrun() {  # logrun LOG CMD...: CMD's output to LOG, its end (progress bars thinned) shown, its exit code kept
  local log=$1; shift
  "$@" > "$log" 2>&1
  local rc=$?
  bars < "$log" | tail -n 25
  return $rc
}
left() {  # left LIMIT: LIMIT, or the seconds before the lease's deadline if fewer (at least 1)
  local l=$1
  if [ -f "$D/deadline" ]; then
    local d=$(( $(cat "$D/deadline") - $(date +%s) ))
    [ "$d" -lt "$l" ] && l=$d
  fi
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}
wait_model() {  # wait_model NAME: until stage_model.sh has converted it (chunks may still be arriving)
  local t=0
  until [ -f "$LOOKAHEADKV_HOME/models/$1/.complete" ]; do
    [ $(( t % 60 )) = 0 ] && echo "waiting for $1 ($(bash "$CODE/scripts/gpu/stage_model.sh" status "$1"))"
    [ "$(left 99999)" -le 1 ] && { echo "deadline passed waiting for $1"; return 1; }
    sleep 5; t=$(( t + 5 ))
  done
}
stage() {  # stage NAME: 1 if done before; reads the knobs written since the start
  [ -f "$R/$1.done" ] && { echo "== $MODEL $1 done before"; return 1; }
  # shellcheck disable=SC1091
  [ -f "$D/knobs.env" ] && source "$D/knobs.env"
  echo "== $MODEL $1 $(date -u +%T) (left: $(left 99999) s)"
}
done_() { touch "$R/$1.done"; echo "== $MODEL $1 finished $(date -u +%T)"; }
run() {  # run NAME ARGS...: one training run into $W/NAME, its log to $R/NAME.log, its train_log.json to $R
  local name=$1; shift
  lkv train --model "$MODEL" --device "$DEVICE" --prompts "$P" --out "$W/$name" --checkpoint-every 100 \
    --evals "$EVALS" --collect-time-limit 0 "$@" > "$R/$name.log" 2>&1
  bars < "$R/$name.log" | tail -n 3 | sed "s/^/[$name] /"
  cp "$W/$name/train_log.json" "$R/$name.train_log.json" 2>/dev/null
}
has_cap_ablation() { [[ $ABLATIONS == *"--response-tokens"* ]]; }

st_bench() {
  logrun "$R/bench.log" lkv bench-train --model "$MODEL" --device "$DEVICE" --prompts "$BENCH_P" \
    --samples "${BENCH_SAMPLES:-2048}" --response-tokens "$BENCH_CAP" --batch-size 16 --steps "${BENCH_STEPS:-60}" \
    --generate-batches "${GEN_BATCHES-256}" --generate-share 0.125 --profile --out "$R/bench"
}
st_targets() {
  local tl=${TARGETS_LIMIT:-100000}
  logrun "$R/targets$CAP.log" lkv targets --model "$MODEL" --device "$DEVICE" --prompts "$P" --samples "$N_MAIN" \
    --targets "$T/t$CAP" --response-tokens "$CAP" --time-limit "$(left "$tl")" \
    ${TARGET_TOKENS:+--batch-tokens "$TARGET_TOKENS"} || return 1
  if has_cap_ablation; then
    logrun "$R/targets$CAP2.log" lkv targets --model "$MODEL" --device "$DEVICE" --prompts "$P" --samples "$N_ABL" \
      --targets "$T/t$CAP2" --response-tokens "$CAP2" --time-limit "$(left "$tl")"
  fi
}
st_sweep() {
  for lr in $LRS; do
    run "sweep_lr$lr" --samples "$N_ABL" --targets "$T/t$CAP" --response-tokens "$CAP" --epochs 1 --batch-size "$BS" \
      --lr "$lr" &
  done
  wait
  ls "$R"/sweep_lr*.train_log.json > /dev/null 2>&1
}
best_lr() {  # best_lr [PREFIX]: the lr of the PREFIX_lr* runs (default: the sweep's) best by validation
  python3 - "$R" "$LR" "${1:-sweep}" <<'EOF'   # recall@64 (a run too small to validate: any), else LR
import json, pathlib, sys
runs = {p.name.split("_lr")[1].removesuffix(".train_log.json"): json.loads(p.read_text())["training"]
        for p in pathlib.Path(sys.argv[1]).glob(f"{sys.argv[3]}_lr*.train_log.json")}
print(max(runs, key=lambda lr: runs[lr]["validation"]["final"].get("recall@64", -1)) if runs else sys.argv[2])
EOF
}
st_main() {
  local best
  best=$(best_lr)
  echo "lr: $best" | tee "$R/lr.txt"
  # MAIN_LRS (a short lease: no sweep) trains one main run per lr side by side; the best by validation
  # recall@64 becomes main (the others are the sweep)
  # A warm start (INIT) without MAIN_LRS: train's own default, the rate its module's schedule ended with (3e-3
  # again undid the 1.5B's module on 2026-12-02)
  local lr lrs=${MAIN_LRS:-$best}
  [ -n "${INIT:-}" ] && [ -z "${MAIN_LRS:-}" ] && lrs=init
  for lr in $lrs; do
    # shellcheck disable=SC2046
    run "main_lr$lr" --samples "$N_MAIN" --targets "$T/t$CAP" --response-tokens "$CAP" --epochs "$EPOCHS" \
      --batch-size "$BS" $([ "$lr" = init ] || echo --lr "$lr") --time-limit "$(left "$MAIN_LIMIT")" --fit-time-limit \
      ${INIT:+--init "$INIT"} &
  done
  local a name args store cap abl=()
  IFS='|' read -ra abl <<< "$ABLATIONS"
  for a in "${abl[@]}"; do
    name=${a%%:*} args=${a#*:} store="$T/t$CAP" cap="--response-tokens $CAP"
    [[ $args == *"--response-tokens"* ]] && store="$T/t$CAP2" cap=""
    # shellcheck disable=SC2086
    run "abl_$name" --samples "$N_ABL" --targets "$store" --epochs 1 --batch-size "$BS" --lr "$best" $cap $args &
  done
  wait
  local won
  won=$(best_lr main)
  if [ -d "$W/main_lr$won" ]; then
    rm -rf "$W/main" && cp -r "$W/main_lr$won" "$W/main" && echo "main: lr $won" | tee "$R/main_best.txt"
  fi
  [ -f "$W/main/lookahead.json" ] || [ -f "$W/main/checkpoint/lookahead.json" ]
}
st_bf16() {  # the module in bf16, as shipped; a time-stopped run's checkpoint, its log saying so
  logrun "$R/bf16.log" python3 "$CODE/scripts/gpu/ship_module.py" --model "$MODEL" --run "$W/main" \
    --out "$W/main_bf16" --device "$DEVICE" || return 1
  # a warm start that ended below its start (ship_module.py's BELOW_START) leaves the snapshot's module as it was
  if [ "$CODE" = "$D/code" ] && [ ! -f "$W/main_bf16/BELOW_START" ]; then  # into start.sh's snapshot: `lookahead`
    rm -rf "$CODE/lookaheadkv/modules/$MODEL" && cp -r "$W/main_bf16" "$CODE/lookaheadkv/modules/$MODEL"  # finds it
  fi
}
st_recall() {
  local head=$D/heldout_200.json M=$W/main
  [ -f "$M/lookahead.json" ] || M=$W/main_bf16
  [ "$RECALL_N" = 200 ] || head=$W/heldout_$RECALL_N.json
  local common=(--model "$MODEL" --samples "$RECALL_N" --min-tokens 1000 --max-tokens 3000 --budgets 32,64,128,256
                --response-tokens 96 --answer-tokens 32 --batch-size 20 --device "$DEVICE" --samples-file "$head")
  logrun "$R/recall.log" python3 "$CODE/scripts/lookahead_eval.py" "${common[@]}" --module "$M" --targets "$T/t$CAP" \
    --target-tokens "$CAP" --prompts "$P" --val-max 64 --methods lookahead,snapkv,pyramidkv,h2o,streamingllm \
    --f1-methods lookahead,snapkv --f1-budgets 64,128 --out "$R/recall" \
  && logrun "$R/recall_bf16.log" python3 "$CODE/scripts/lookahead_eval.py" "${common[@]}" --module "$W/main_bf16" \
    --methods lookahead --f1-methods lookahead --f1-budgets 64,128 --out "$R/recall_bf16"
}
rounds() {  # rounds NAME METHODS LIMIT: EVAL_PLAN for METHODS into $R/NAME/, rows gzipped at the end
  local name=$1 methods=$2 limit rc S
  limit=$(left "$3")
  S=$(ls "$D"/${SAMPLES:-eval_samples_*.jsonl.gz} 2>/dev/null | paste -sd,)  # sample ids name no tokenizer
  [ -n "$S" ] || { echo "no eval samples in $D"; return 1; }
  mkdir -p "$R/$name"
  for f in "$R/$name"/*.jsonl.gz; do [ -f "$f" ] && gunzip -f "$f"; done  # resume from an earlier run's rows
  local file
  for file in $(echo "$EVAL_PLAN" | tr ';' '\n' | awk -F: 'NF == 4 { print $4 }' | sort -u); do
    # or from an earlier lease's, committed in results/eval/ (scripts/gpu/unpack.py merged them there)
    # less the rows of the methods a new module changes (eval: the module just trained), which a row's key,
    # naming the method and not its module, would otherwise count as done
    [ -f "$R/$name/$file.jsonl" ] || [ ! -f "$CODE/results/eval/$file.jsonl.gz" ] \
      || gunzip -c "$CODE/results/eval/$file.jsonl.gz" | PYTHONPATH="$CODE/scripts/gpu" python3 -c 'import json, sys
from eval_rounds import label
drop = {label(m) for m in sys.argv[1].split(",") if m}
sys.stdout.writelines(x for x in sys.stdin if json.loads(x)["method"] not in drop)' "${FRESH:-}" > "$R/$name/$file.jsonl"
  done
  logrun "$R/$name.log" timeout $(( limit + 120 )) python3 "$CODE/scripts/gpu/eval_rounds.py" --model "$MODEL" \
    --samples "$S" --methods "$methods" --budgets "$EVAL_BUDGETS" --plan "$EVAL_PLAN" --out "$R/$name" \
    --seconds "$limit" --batch "$EVAL_BATCH" --device "$DEVICE" --dtype "$DTYPE"
  rc=$?
  gzip -f "$R/$name"/*.jsonl 2>/dev/null
  return $rc
}
st_eval() {  # the module just trained: its rows anew (unless it was not kept: the committed rows stand)
  local fresh=$EVAL_METHODS
  [ -f "$W/main_bf16/BELOW_START" ] && fresh=""
  FRESH=$fresh rounds eval "$EVAL_METHODS" "$EVAL_LIMIT"
}
st_compare() {
  [[ $COMPARE_METHODS == *"draft_model=$DRAFT"* ]] && { wait_model "$DRAFT" || return 1; }
  rounds compare "$COMPARE_METHODS" "$COMPARE_LIMIT"
}
st_cost() {
  local draft=() others rc
  [[ $COST_METHODS == *speckv* ]] && { wait_model "$DRAFT" && draft=(--draft-model "$DRAFT"); }
  # Timings need the GPU alone: the other lanes' GPU processes are paused (SIGSTOP) while it runs (on
  # 2026-12-02 four jobs time-sliced the GPU and each ran at a quarter of its speed), and so are the lanes' jobs
  # not yet on the GPU (a lane started seconds before was still loading its model, and ran beside the benchmark)
  others=$({ nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' '
             pgrep -f "^([^ ]*/)?python3 (-c from lookaheadkv\.cli|$CODE/scripts/)"; } | sort -u | paste -sd' ')
  # shellcheck disable=SC2086
  [ -n "$others" ] && kill -STOP $others 2>/dev/null && echo "paused for the benchmark: $others"
  logrun "$R/cost.log" timeout "$(left "$COST_LIMIT")" python3 -c "from lookaheadkv.cli import main; main()" bench \
    --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --contexts "$COST_CONTEXTS" --methods "$COST_METHODS" \
    --budget "${COST_BUDGET:-1024}" --decode-batches "" --repeats "${COST_REPEATS:-3}" \
    "${draft[@]}" --out "$R/cost"
  rc=$?
  # shellcheck disable=SC2086
  [ -n "$others" ] && kill -CONT $others 2>/dev/null
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader > "$R/gpu.txt" 2>&1
wait_model "$MODEL" || exit 1
for s in $STAGES; do
  name=${s%&}
  if [ "$name" != "$s" ]; then
    ( stage "$name" && { "st_$name" && done_ "$name" || echo "== $MODEL $name FAILED"; } ) &
  elif stage "$name"; then
    "st_$name" && done_ "$name" || echo "== $MODEL $name FAILED"
  fi
done
wait
echo "== $MODEL pipeline finished $(date -u +%T)"
