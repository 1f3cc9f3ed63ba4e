#!/usr/bin/env bash
# GPU side: start a lease's work as background jobs that outlive the calls: `bash scripts/gpu/start.sh PLAN`.
# Idempotent: lanes already running are left alone and only reported, so every call of a lease may end with it.
# Each lane runs scripts/gpu/pipeline.sh for its models in turn, from a snapshot of the code taken at the first
# start ($LKV_DIR/code: each call lays the tree anew); a pipeline waits until its model is staged and converted,
# so the lanes may start in the first staging call. Logs: $LKV_DIR/lane-N.log.
#   PLAN qwen (issue 13), two lanes side by side on the one GPU:
#     lane 1: qwen2.5-coder-1.5b-instruct "targets main bf16 cost eval", then qwen2.5-coder-0.5b-instruct
#             "targets main bf16 eval" (the module first: it is what the comparison and the cost need)
#     lane 2: qwen2.5-coder-1.5b-instruct "compare" (waits for the 0.5B, SpecKV's draft), then the 0.5B's
#   PLAN smollm2: one lane, smollm2-135m-instruct with its profile's stages (bench ... recall)
#   PLAN "MODEL:stage,stage MODEL:stage;MODEL:stage": lanes separated by ";", each a list of MODEL:stages.
# LEASE_LEFT (seconds, default 1200): from now until the results must be collected; written once, as
# $LKV_DIR/deadline, which every stage's time limit respects (later calls: `echo $(( $(date +%s) + 300 )) >
# /tmp/lkv/deadline` moves it). Other knobs go to the pipelines through the environment or $LKV_DIR/knobs.env.
#
# A lease for issue 13 (measured 2026-12-02: ~6 s a staging call beyond its command, 35 calls; startup ~40 s):
#   CPU, before: `bash scripts/gpu/stage.sh qwen` -> .gpu/calls-qwen.txt, one carry list a line (the 1.5B's 22
#     chunks with the prompts and samples beside them, then the 0.5B's 10). Copy .gpu/ and .whl/ to the checkout
#     the calls are made from if they were made in another. Rehearse first: scripts/gpu/rehearse_pipeline.sh.
#     Every call carries the tree: with the shipped modules' weights tracked (27 MB) a chunk gets ~21 MiB (75
#     calls); on 2026-12-02 19:00 they were left out of the index for the lease (`git rm --cached` + an entry in
#     .git/info/exclude, restored after) and `CHUNK_MIB=48 stage.sh qwen` made 33 calls, the first carrying the
#     1.5B's adapter for INIT=shipped. The tree grows: on 2026-12-07 it was 17.7 MiB without those weights, and 48
#     MiB chunks no longer fit beside it (plan_calls.py says so); CHUNK_MIB=44 made 25 calls for the 1.5B.
#   calls 1..N (~4 min), back to back: run(carry=LINE, command="source scripts/gpu/device_setup.sh;
#     LEASE_LEFT=S bash scripts/gpu/start.sh qwen"), S = the seconds from the first call until the last one must
#     begin (status's budget_left_s less ~240 for the final collection and margin; read once). The 1.5B converts
#     in the background as its last chunk lands (~1 min); lane 1 collects targets while the 0.5B's chunks arrive.
#   then: run(command="bash scripts/gpu/wait_for.sh qwen2.5-coder-1.5b-instruct:bf16 540") -> the module comes
#     back; run(command="bash scripts/gpu/wait_for.sh qwen2.5-coder-1.5b-instruct:eval 540") until the deadline
#     -> the cost table (the other lane paused meanwhile), lookahead and compare rows.
#   Jobs side by side share the GPU by time-slicing: two lanes at most, one of them training; a lane's collection
#     buffer is sized from the free memory when it starts (TARGET_TOKENS fixes it).
#   CPU, after: `python scripts/gpu/unpack.py FILES_AT` (modules into lookaheadkv/modules/, rows merged into
#     results/eval/, logs and benchmarks into results/train|bench/MODEL_CARD/, or their runs/NAME/ with --run), then `lookaheadkv report` and
#     `python scripts/readme_table.py`. A later lease resumes the rounds from the committed rows; a module
#     trained anew has its lookahead rows redone by the eval stage (unpack replaces them).
set -uo pipefail
[ -n "${LKV_ENV:-}" ] || source scripts/gpu/device_setup.sh > /dev/null
D=$LKV_DIR
case "${1:-qwen}" in
  qwen) q15=qwen2.5-coder-1.5b-instruct q05=qwen2.5-coder-0.5b-instruct
        plan="$q15:targets,main,bf16,cost,eval $q05:targets,main,bf16,eval;$q15:compare $q05:compare" ;;
  smollm2) plan="smollm2-135m-instruct:" ;;
  *) plan=$1 ;;
esac
[ -f "$D/deadline" ] || echo $(( $(date +%s) + ${LEASE_LEFT:-1200} )) > "$D/deadline"
if [ ! -d "$D/code" ]; then
  # the code, and the committed evaluation rows the rounds resume from
  mkdir -p "$D/code.tmp/results" && cp -r lookaheadkv scripts "$D/code.tmp/" && cp -r results/eval "$D/code.tmp/results/" \
    && mv "$D/code.tmp" "$D/code"
fi
IFS=';' read -ra lanes <<< "$plan"
for i in "${!lanes[@]}"; do
  pid=$D/lane-$i.pid
  if [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; then
    echo "lane $i running: $(grep '^== ' "$D/lane-$i.log" | tail -1)"
    continue
  fi
  [ -f "$pid" ] && { echo "lane $i ended: $(tail -1 "$D/lane-$i.log")"; continue; }
  script=""
  for item in ${lanes[$i]}; do
    model=${item%%:*} stages=${item#*:}
    # shellcheck disable=SC2016
    script+="MODEL=$model ${stages:+STAGES=\"${stages//,/ }\"} CODE=$D/code bash $D/code/scripts/gpu/pipeline.sh; "
  done
  # the lane writes its own pid: setsid forks when its caller leads a process group, so $! is not the lane's
  (cd "$D/code" && setsid nohup bash -c "echo \$\$ > '$pid'; $script" > "$D/lane-$i.log" 2>&1 < /dev/null &)
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$pid" ] && break; sleep 0.2; done
  echo "lane $i started: $script"
done
echo "deadline in $(( $(cat "$D/deadline") - $(date +%s) )) s"
