#!/usr/bin/env bash
# GPU side of the training issue (11): on one H200, in one lease, everything that needs the GPU, in stages that
# each leave a .done marker (a rerun skips what is done), run as a background job that outlives the calls:
#   1 bench     the trainer's benchmark (collection and training throughput, target forms) -> results/train/
#   2 targets   responses + true importance for the 24K training prompts (cap 512), and cap 256 for the subset
#   3 sweep     learning rate on the subset (N_ABL prompts, one epoch), in parallel; the best by validation
#               recall@64 is used below (and is the ablations' baseline)
#   4 main      the module on all prompts (EPOCHS epochs) and, beside it, the ablations on the subset
#   5 recall    importance recall and F1 on 200 held-out TEST-split prompts (scripts/lookahead_eval.py), for the
#               module in fp32 and in bf16 (shipped if equal)
#   6 eval      RULER 4K + QA, RULER 8K, fidelity for `lookahead` with the new module (the other methods' rows
#               do not depend on it and are kept)
# Staging (CPU side first: scripts/gpu/stage.sh), then calls of the device tool, each within 30 s of the last:
#   call 1: carry [".whl", ".gpu/smollm2.part0", ".gpu/prompts_24k.safetensors.xz"],
#           command `source scripts/gpu/device_setup.sh; echo staged`
#   call 2: carry [".whl", ".gpu/smollm2.part1", ".gpu/eval_samples_4k.jsonl.gz", ".gpu/heldout_200.json",
#                  ".gpu/prompts_bench.safetensors.xz"], command `source scripts/gpu/device_setup.sh; echo staged`
#   call 3: carry [".whl", ".gpu/smollm2.part2", ".gpu/eval_samples_8k.jsonl.gz"],
#           command `source scripts/gpu/device_setup.sh; setsid nohup bash scripts/gpu/train_smollm2.sh \
#                    > /tmp/lkv/pipeline.log 2>&1 < /dev/null & sleep 540; bash scripts/gpu/collect_out.sh`
#   later calls: `sleep 560; bash scripts/gpu/collect_out.sh` (the job goes on while the machine is held),
#   and when it has finished, `bash scripts/gpu/collect_out.sh` once more: $OUT gets what is done so far.
set -uo pipefail
source scripts/gpu/device_setup.sh
W=/tmp/lkv/work R=/tmp/lkv/results P=/tmp/lkv/prompts_24k.safetensors
mkdir -p "$W" "$R"
export TQDM_MININTERVAL=15
N_MAIN=${N_MAIN:-24000} N_ABL=${N_ABL:-6000} EPOCHS=${EPOCHS:-2} BS=${BS:-16} LRS=${LRS:-1e-3 3e-3 1e-2}
ABLATIONS=${ABLATIONS:-"rank0:--rank 0|n8:--n 8|n64:--n 64|rank16:--rank 16|cap256:--response-tokens 256"}
lkv() { python3 -c "from lookaheadkv.cli import main; main()" "$@"; }
stage() { [ -f "$R/$1.done" ] && { echo "== $1 done before"; return 1; }; echo "== $1 $(date -u +%T)"; }
done_() { touch "$R/$1.done"; echo "== $1 finished $(date -u +%T)"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$R/gpu.txt"

if stage bench; then
  lkv bench-train --device cuda --prompts /tmp/lkv/prompts_bench.safetensors --samples "${BENCH_SAMPLES:-2048}" \
    --response-tokens 256 --batch-size 16 --steps 60 --generate-batches 256 --generate-share 0.125 \
    --out "$R/bench" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -40 && done_ bench
fi

if stage targets; then
  lkv targets --device cuda --prompts "$P" --samples "$N_MAIN" --targets "$W/t512" --response-tokens 512 \
    2>&1 | tr '\r' '\n' | tee "$R/targets512.log" | grep -v "prompt/s\]$" | tail -25
  lkv targets --device cuda --prompts "$P" --samples "$N_ABL" --targets "$W/t256" --response-tokens 256 \
    2>&1 | tr '\r' '\n' | tee "$R/targets256.log" | grep -v "prompt/s\]$" | tail -25
  done_ targets
fi

run() {  # run NAME ARGS...: one training run into $W/NAME, its log to $R/NAME.log
  local name=$1; shift
  lkv train --device cuda --prompts "$P" --out "$W/$name" --checkpoint-every 500 "$@" 2>&1 | tr '\r' '\n' \
    | grep -v "step/s\]$\|s/step\]$" > "$R/$name.log"
  cp "$W/$name/train_log.json" "$R/$name.train_log.json" 2>/dev/null
}

if stage sweep; then
  for lr in $LRS; do
    run "sweep_lr$lr" --samples "$N_ABL" --targets "$W/t512" --response-tokens 512 --epochs 1 --batch-size "$BS" \
      --lr "$lr" &
  done
  wait
  done_ sweep
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
  run main --samples "$N_MAIN" --targets "$W/t512" --response-tokens 512 --epochs "$EPOCHS" --batch-size "$BS" \
    --lr "$BEST" --time-limit "${MAIN_LIMIT:-900}" &
  IFS='|' read -ra abl <<< "$ABLATIONS"
  for a in "${abl[@]}"; do
    name=${a%%:*} args=${a#*:}
    store="$W/t512"; [[ $args == *"--response-tokens 256"* ]] && store="$W/t256"
    # shellcheck disable=SC2086
    run "abl_$name" --samples "$N_ABL" --targets "$store" --epochs 1 --batch-size "$BS" --lr "$BEST" \
      $([[ $args == *"--response-tokens"* ]] || echo "--response-tokens 512") $args &
  done
  wait
  [ -f "$W/main/lookahead.json" ] && done_ main
fi

M=$W/main
if [ -f "$M/lookahead.json" ] && stage recall; then
  python3 - "$M" "$W/main_bf16" <<'EOF'
import sys, torch
from lookaheadkv import lookahead as la
from lookaheadkv.models import load_model
model, _ = load_model("smollm2-135m-instruct", device="cuda")
mod = la.load(model, sys.argv[1])
la.save(model, mod, sys.argv[2], training=mod.meta.get("training"), dtype=torch.bfloat16)
EOF
  cp "$M/train_log.json" "$W/main_bf16/"
  common=(--model smollm2-135m-instruct --samples 200 --min-tokens 1000 --max-tokens 3000 --budgets 32,64,128,256
          --response-tokens 96 --answer-tokens 32 --batch-size 20 --device cuda --samples-file /tmp/lkv/heldout_200.json)
  python3 scripts/lookahead_eval.py "${common[@]}" --module "$M" --targets "$W/t512" --prompts "$P" \
    --methods lookahead,snapkv,pyramidkv,h2o,streamingllm --f1-methods lookahead,snapkv --f1-budgets 64,128 \
    --out "$R/recall" 2>&1 | tr '\r' '\n' | grep -v "batch/s\]$" | tail -30
  python3 scripts/lookahead_eval.py "${common[@]}" --module "$W/main_bf16" --methods lookahead --f1-methods lookahead \
    --f1-budgets 64,128 --out "$R/recall_bf16" 2>&1 | tr '\r' '\n' | grep -v "batch/s\]$" | tail -12
  done_ recall
fi

if [ -f "$W/main_bf16/lookahead.json" ] && stage eval; then
  EVAL_OUT=$R/eval
  mkdir -p "$EVAL_OUT"
  S=$(ls /tmp/lkv/eval_samples_*.jsonl.gz | paste -sd,)
  timeout "${EVAL_SECONDS:-600}" python3 - "$S" "$EVAL_OUT" "$W/main_bf16" <<'EOF' 2>&1 | tr '\r' '\n' | grep -v "row/s\]$" | tail -20
import sys, time, torch
from lookaheadkv.evaluation import runner
from lookaheadkv.methods import parse_methods
from lookaheadkv.models import load_model
samples = {k: v for f in sys.argv[1].split(",") for k, v in runner.load_samples(f).items()}
out, module = sys.argv[2], sys.argv[3]
model, tok = load_model("smollm2-135m-instruct", device="cuda", dtype=torch.float32)
methods = parse_methods(f"lookahead:module={module}")
for length, tasks, name in ((4096, "ruler,qa", "smollm2_4k"), (8192, "ruler", "smollm2_8k"),
                            (4096, "fidelity", "smollm2_fidelity_4k")):
    t = time.perf_counter()
    rows = runner.run_eval(model, tok, tasks, methods, [32, 64, 128, 256, 512], 50, length, f"{out}/{name}.jsonl",
                           model_name="smollm2-135m-instruct", batch=50, samples=samples)
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - t:.0f} s", flush=True)
EOF
  gzip -f "$EVAL_OUT"/*.jsonl
  done_ eval
fi
echo "== pipeline finished $(date -u +%T)"
