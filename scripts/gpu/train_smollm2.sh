#!/usr/bin/env bash
# GPU side of the training issue (11): on one H200, in one lease, everything that needs the GPU, in stages that
# each leave a .done marker (a rerun skips what is done), run as a background job that outlives the calls:
#   1 bench     the trainer's benchmark (collection and training throughput, target forms) -> results/train/
#   2 targets   responses + true importance for the 24K training prompts (cap CAP=512), and cap CAP2=256 for
#               the subset (the first N_ABL prompts)
#   3 sweep     learning rate on the subset (one epoch), in parallel; the best by validation recall@64 is used
#               below (and is the ablations' baseline)
#   4 main      the module on all prompts (EPOCHS epochs) and, beside it, the ablations on the subset
#   5 recall    importance recall and F1 on 200 held-out TEST-split prompts (scripts/lookahead_eval.py), for the
#               module in fp32 and in bf16 (shipped if equal)
#   6 eval      RULER 4K + QA, RULER 8K, fidelity for `lookahead` with the new module (the other methods' rows
#               do not depend on it and are kept)
# Staging (CPU side first: scripts/gpu/stage.sh), then calls of the device tool, each within 30 s of the last:
#   call 1: carry [".whl", ".gpu/smollm2.part0", ".gpu/prompts_24k.safetensors.xz"],
#           command `source scripts/gpu/device_setup.sh`
#   call 2: carry [".whl", ".gpu/smollm2.part1", ".gpu/eval_samples_4k.jsonl.gz", ".gpu/heldout_200.json",
#                  ".gpu/prompts_bench.safetensors.xz"], command `source scripts/gpu/device_setup.sh`
#   call 3: carry [".whl", ".gpu/smollm2.part2", ".gpu/eval_samples_8k.jsonl.gz"],
#           command `source scripts/gpu/device_setup.sh; cp scripts/gpu/train_smollm2.sh /tmp/lkv/pipeline.sh;
#                    setsid nohup bash /tmp/lkv/pipeline.sh > /tmp/lkv/pipeline.log 2>&1 < /dev/null &
#                    bash scripts/gpu/wait_for.sh bench 300`
#           (a copy runs: each call lays the tree anew, and bash reads a script as it goes)
#   later calls: `bash scripts/gpu/wait_for.sh STAGE SECONDS` (the job goes on while the machine is held); it
#   shows the log and puts what is done so far into $OUT. Knobs for later stages can be changed on the way:
#   `echo EPOCHS=2 >> /tmp/lkv/knobs.env` (read when a stage starts).
# Knobs (environment): N_MAIN, N_ABL, EPOCHS, BS, LRS, ABLATIONS, MAIN_LIMIT, CAP, CAP2, and for a rehearsal on
# the CPU with a small prompt file: DEVICE=cpu P=... BENCH_P=... RECALL_N=... EVAL_N=... (LKV_DIR: the folder).
set -uo pipefail
source scripts/gpu/device_setup.sh > /dev/null
D=${LKV_DIR:-/tmp/lkv} DEVICE=${DEVICE:-cuda}
W=$D/work R=$D/results P=${P:-$D/prompts_24k.safetensors} BENCH_P=${BENCH_P:-$D/prompts_bench.safetensors}
# The target stores (~30 GB of fp16 truth for the 24K prompts) go to shared memory when it has room: no disk in
# the way of the collection's writes, and the parallel runs read one copy.
T=$W
avail=$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)
[ -n "$avail" ] && [ "$avail" -gt 50000000 ] && T=/dev/shm/lkv
mkdir -p "$W" "$R" "$T"
df -h /tmp /dev/shm > "$R/disk.txt"
export TQDM_MININTERVAL=15
N_MAIN=${N_MAIN:-24000} N_ABL=${N_ABL:-4000} EPOCHS=${EPOCHS:-1} BS=${BS:-16} LRS=${LRS:-1e-3 3e-3 1e-2}
RECALL_N=${RECALL_N:-200} EVAL_N=${EVAL_N:-50} CAP=${CAP:-512} CAP2=${CAP2:-256} BENCH_CAP=${BENCH_CAP:-256}
# name:options, on the subset at the sweep's best lr; "cap" trains on the CAP2-token response targets
ABLATIONS=${ABLATIONS:-"rank0:--rank 0|n8:--n 8|n16:--n 16|n64:--n 64|rank4:--rank 4|rank16:--rank 16|cap:--response-tokens $CAP2"}
lkv() { python3 -c "from lookaheadkv.cli import main; main()" "$@"; }
bars() { tr '\r' '\n' | awk '/%\|/ { last = $0; next } { print } END { if (last) print last }'; }  # one bar line
logrun() {  # logrun LOG CMD...: CMD's output to LOG, its end (progress bars thinned) shown, its exit code kept
  local log=$1; shift
  "$@" > "$log" 2>&1
  local rc=$?
  bars < "$log" | tail -n 25
  return $rc
}
# A stage starts by reading $D/knobs.env (if a call has written one since: knobs set after seeing the bench).
stage() {
  [ -f "$R/$1.done" ] && { echo "== $1 done before"; return 1; }
  # shellcheck disable=SC1091
  [ -f "$D/knobs.env" ] && source "$D/knobs.env"
  echo "== $1 $(date -u +%T) N_MAIN=$N_MAIN N_ABL=$N_ABL EPOCHS=$EPOCHS BS=$BS"
}
done_() { touch "$R/$1.done"; echo "== $1 finished $(date -u +%T)"; }
run() {  # run NAME ARGS...: one training run into $W/NAME, its log to $R/NAME.log, its train_log.json to $R
  local name=$1; shift
  lkv train --device "$DEVICE" --prompts "$P" --out "$W/$name" --checkpoint-every 500 "$@" > "$R/$name.log" 2>&1
  bars < "$R/$name.log" | tail -n 3 | sed "s/^/[$name] /"
  cp "$W/$name/train_log.json" "$R/$name.train_log.json" 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader > "$R/gpu.txt" 2>&1
for s in ${SKIP:-}; do touch "$R/$s.done"; done  # stages a short lease leaves out (e.g. SKIP="bench sweep")

if stage bench; then
  logrun "$R/bench.log" lkv bench-train --device "$DEVICE" --prompts "$BENCH_P" --samples "${BENCH_SAMPLES:-2048}" \
    --response-tokens "$BENCH_CAP" --batch-size 16 --steps "${BENCH_STEPS:-60}" --generate-batches "${GEN_BATCHES-256}" \
    --generate-share 0.125 --profile --out "$R/bench" && done_ bench
fi

if stage targets; then
  logrun "$R/targets$CAP.log" lkv targets --device "$DEVICE" --prompts "$P" --samples "$N_MAIN" --targets "$T/t$CAP" \
    --response-tokens "$CAP" \
  && { [ "$CAP2" = 0 ] || logrun "$R/targets$CAP2.log" lkv targets --device "$DEVICE" --prompts "$P" \
    --samples "$N_ABL" --targets "$T/t$CAP2" --response-tokens "$CAP2"; } && done_ targets
fi

if stage sweep; then
  for lr in $LRS; do
    run "sweep_lr$lr" --samples "$N_ABL" --targets "$T/t$CAP" --response-tokens "$CAP" --epochs 1 --batch-size "$BS" \
      --lr "$lr" &
  done
  wait
  ls "$R"/sweep_lr*.train_log.json > /dev/null 2>&1 && done_ sweep
fi
BEST=$(python3 - "$R" <<'EOF'
import json, pathlib, sys
runs = {p.name.split("_lr")[1].removesuffix(".train_log.json"): json.loads(p.read_text())["training"]
        for p in pathlib.Path(sys.argv[1]).glob("sweep_lr*.train_log.json")}
print(max(runs, key=lambda lr: runs[lr]["validation"]["final"]["recall@64"]) if runs else "3e-3")
EOF
)
echo "best lr: $BEST" | tee "$R/best_lr.txt"

if stage main; then
  # MAIN_LRS (a short lease, no sweep): one main run per lr, side by side; the best by validation recall@64 is
  # the module (the others are the sweep)
  for lr in ${MAIN_LRS:-$BEST}; do
    run "main_lr$lr" --samples "$N_MAIN" --targets "$T/t$CAP" --response-tokens "$CAP" --epochs "$EPOCHS" \
      --batch-size "$BS" --lr "$lr" --time-limit "${MAIN_LIMIT:-900}" &
  done
  IFS='|' read -ra abl <<< "$ABLATIONS"
  for a in "${abl[@]}"; do
    name=${a%%:*} args=${a#*:}
    store="$T/t$CAP" cap="--response-tokens $CAP"
    [[ $args == *"--response-tokens"* ]] && store="$T/t$CAP2" cap=""
    # shellcheck disable=SC2086
    run "abl_$name" --samples "$N_ABL" --targets "$store" --epochs 1 --batch-size "$BS" --lr "$BEST" $cap $args &
  done
  wait
  python3 - "$R" "$W" <<'EOF'
import json, pathlib, shutil, sys
r, w = map(pathlib.Path, sys.argv[1:])
runs = {p.name.removesuffix(".train_log.json"): json.loads(p.read_text())["training"]["validation"]["final"]
        for p in r.glob("main_lr*.train_log.json")}
if runs:
    best = max(runs, key=lambda k: runs[k]["recall@64"])
    print("main runs (validation recall@64):", {k: round(v["recall@64"], 4) for k, v in runs.items()}, "->", best)
    shutil.rmtree(w / "main", ignore_errors=True)
    shutil.copytree(w / best, w / "main", ignore=shutil.ignore_patterns("checkpoint*", "targets"))
    (r / "main_best.txt").write_text(best + "\n")
EOF
  [ -f "$W/main/lookahead.json" ] && done_ main
fi

M=$W/main
if [ -f "$M/lookahead.json" ] && [ ! -f "$W/main_bf16/lookahead.json" ]; then
  python3 - "$M" "$W/main_bf16" "$DEVICE" <<'EOF'
import sys, torch
from lookaheadkv import lookahead as la
from lookaheadkv.models import load_model
model, _ = load_model("smollm2-135m-instruct", device=sys.argv[3])
mod = la.load(model, sys.argv[1])
la.save(model, mod, sys.argv[2], training=mod.meta.get("training"), dtype=torch.bfloat16)
EOF
  cp "$M/train_log.json" "$W/main_bf16/"
fi

# 6, in the background beside 5 (the GPU has room for both)
if [ -f "$W/main_bf16/lookahead.json" ] && stage eval; then
  mkdir -p "$R/eval"
  S=$(ls "$D"/eval_samples_*.jsonl.gz | paste -sd,)
  ( logrun "$R/eval.log" timeout "${EVAL_SECONDS:-600}" python3 - "$S" "$R/eval" "$DEVICE" "$EVAL_N" \
      "$W/main_bf16" <<'EOF'
import sys, time, torch
from lookaheadkv.evaluation import runner
from lookaheadkv.methods import get_method
from lookaheadkv.models import load_model
samples = {k: v for f in sys.argv[1].split(",") for k, v in runner.load_samples(f).items()}
out, device, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
model, tok = load_model("smollm2-135m-instruct", device=device, dtype=torch.float32)
methods = {"lookahead": get_method("lookahead", module=sys.argv[5])}  # the new module, in bf16 as it is shipped
# RULER 4K first (the issue's targets); 8K: the 25 samples a task that the other methods have rows for
for length, tasks, name, k in ((4096, "ruler,qa", "smollm2_4k", n), (8192, "ruler", "smollm2_8k", min(n, 25)),
                               (4096, "fidelity", "smollm2_fidelity_4k", n)):
    t = time.perf_counter()
    rows = runner.run_eval(model, tok, tasks, methods, [32, 64, 128, 256, 512], k, length, f"{out}/{name}.jsonl",
                           model_name="smollm2-135m-instruct", batch=50, samples=samples)
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - t:.0f} s", flush=True)
EOF
    rc=$?
    gzip -f "$R"/eval/*.jsonl
    [ $rc = 0 ] && done_ eval ) &
fi

if [ -f "$W/main_bf16/lookahead.json" ] && stage recall; then
  head=$D/heldout_200.json
  [ "$RECALL_N" = 200 ] || head=$W/heldout_$RECALL_N.json
  common=(--model smollm2-135m-instruct --samples "$RECALL_N" --min-tokens 1000 --max-tokens 3000
          --budgets 32,64,128,256 --response-tokens 96 --answer-tokens 32 --batch-size 20 --device "$DEVICE"
          --samples-file "$head")
  logrun "$R/recall.log" python3 scripts/lookahead_eval.py "${common[@]}" --module "$M" --targets "$T/t$CAP" \
    --target-tokens "$CAP" --prompts "$P" --val-max 64 --methods lookahead,snapkv,pyramidkv,h2o,streamingllm \
    --f1-methods lookahead,snapkv --f1-budgets 64,128 --out "$R/recall" \
  && logrun "$R/recall_bf16.log" python3 scripts/lookahead_eval.py "${common[@]}" --module "$W/main_bf16" \
    --methods lookahead --f1-methods lookahead --f1-budgets 64,128 --out "$R/recall_bf16" && done_ recall
fi
wait
echo "== pipeline finished $(date -u +%T)"
