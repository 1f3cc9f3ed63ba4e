#!/usr/bin/env bash
# Scaling over GPUs (issue 16): the same work with 1, 2 and 4 processes under torchrun (one GPU each):
#   collection  `lookaheadkv targets` into a fresh target store          -> prompts/s (the slowest rank's time)
#   training    `lookaheadkv train` on the 1-process store, global batch BS -> training steps/s (the loop alone)
#   evaluation  `lookaheadkv eval` over pre-made samples                  -> samples/s (run_eval alone)
# and the efficiency of each against the 1-process figure (rate_N / (N x rate_1); the target is >= 85% at 2).
# Writes $OUT/scale.md (the table), scale.json (every figure), COMMAND.md (this command and its knobs), logs/.
#
# On a multi-GPU machine (stage first on the CPU side: bash scripts/gpu/stage.sh), one `run` call:
#   carry [".whl", ".gpu/smollm2.part0", ".gpu/smollm2.part1", ".gpu/smollm2.part2",
#          ".gpu/prompts_bench.safetensors.xz", ".gpu/eval_samples_4k.jsonl.gz"]  (split over calls if over 64 MiB)
#   command `source scripts/gpu/device_setup.sh; OUT=$OUT/scale bash scripts/gpu/scale.sh`
# A process count above the machine's GPUs is skipped (and said so in the table).
# Rehearsal on the CPU (gloo; the figures mean nothing for GPUs), e.g. with a tiny model directory M, prompts made by
# `lookaheadkv prompts --model M ...` and samples by `lookaheadkv eval --model M ... --only-samples`:
#   DEVICE=cpu MODEL=M P=p.safetensors S=s.jsonl.gz NPROCS="1 2" PROMPTS=16 CAP=8 BS=4 EVAL_N=4 EVAL_LEN=300 \
#   EVAL_BATCH=1 TASKS=niah_single_1,niah_single_2 METHODS=snapkv:window=8 BUDGETS=32 OUT=/tmp/scale \
#   bash scripts/gpu/scale.sh
# Knobs: MODEL, DEVICE, NPROCS, P (prompt file), PROMPTS (of it), CAP (response tokens), BS (global batch),
# EPOCHS, S (samples file), TASKS, EVAL_N, EVAL_LEN, EVAL_BATCH, METHODS, BUDGETS, OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-smollm2-135m-instruct} DEVICE=${DEVICE:-cuda} NPROCS=${NPROCS:-1 2 4}
P=${P:-/tmp/lkv/prompts_bench.safetensors} PROMPTS=${PROMPTS:-1024} CAP=${CAP:-256} BS=${BS:-16} EPOCHS=${EPOCHS:-1}
S=${S:-/tmp/lkv/eval_samples_4k.jsonl.gz} TASKS=${TASKS:-ruler} EVAL_N=${EVAL_N:-16} EVAL_LEN=${EVAL_LEN:-4096}
EVAL_BATCH=${EVAL_BATCH:-4} METHODS=${METHODS:-snapkv,pyramidkv,lookahead} BUDGETS=${BUDGETS:-128,256}
OUT=${OUT:-results/scale}
W=$(mktemp -d /tmp/lkv-scale.XXXX)
mkdir -p "$OUT/logs"
export TQDM_MININTERVAL=30
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun gives each of several processes
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
lkv() { local n=$1; shift; python3 -m torch.distributed.run --standalone --nproc-per-node "$n" -m lookaheadkv "$@"; }

cat > "$OUT/COMMAND.md" <<EOF
# Scaling over GPUs

    MODEL=$MODEL DEVICE=$DEVICE NPROCS="$NPROCS" P=$P PROMPTS=$PROMPTS CAP=$CAP BS=$BS EPOCHS=$EPOCHS \\
    S=$S TASKS=$TASKS EVAL_N=$EVAL_N EVAL_LEN=$EVAL_LEN EVAL_BATCH=$EVAL_BATCH METHODS=$METHODS BUDGETS=$BUDGETS \\
    bash scripts/gpu/scale.sh

on $(python3 -c "import torch; print(', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or 'the CPU')"),
torch $(python3 -c "import torch; print(torch.__version__)"), $(date -u +%F).
EOF

for n in $NPROCS; do
  if [ "$DEVICE" != cpu ] && [ "$n" -gt "$gpus" ]; then echo "skip $n processes: $gpus GPU(s)"; continue; fi
  echo "== $n process(es)"
  lkv "$n" targets --model "$MODEL" --prompts "$P" --samples "$PROMPTS" --targets "$W/targets-$n" \
    --response-tokens "$CAP" --device "$DEVICE" > "$OUT/logs/targets-$n.json" 2> "$OUT/logs/targets-$n.log"
  # training reads the 1-process store (the first count run): every count trains on the same targets
  first=$(echo $NPROCS | cut -d' ' -f1)
  lkv "$n" train --model "$MODEL" --prompts "$P" --samples "$PROMPTS" --targets "$W/targets-$first" \
    --response-tokens "$CAP" --batch-size "$BS" --epochs "$EPOCHS" --evals 0 --no-resume --out "$W/train-$n" \
    --device "$DEVICE" > "$OUT/logs/train-$n.json" 2> "$OUT/logs/train-$n.log"
  cp "$W/train-$n/train_log.json" "$OUT/logs/train_log-$n.json"
  lkv "$n" eval --model "$MODEL" --samples "$S" --tasks "$TASKS" --per-task "$EVAL_N" --length "$EVAL_LEN" \
    --batch "$EVAL_BATCH" --methods "$METHODS" --budgets "$BUDGETS" --out "$W/eval-$n.jsonl" --device "$DEVICE" \
    2> "$OUT/logs/eval-$n.log"
  tail -n 1 "$OUT/logs/eval-$n.log"
done

python3 - "$OUT" $NPROCS <<'EOF'
import json, re, sys
from pathlib import Path

out, counts = Path(sys.argv[1]), [int(n) for n in sys.argv[2:]]
rows = {}
for n in counts:
    logs = out / "logs"
    if not (logs / f"eval-{n}.log").exists():
        continue
    coll = json.loads((logs / f"targets-{n}.json").read_text())
    train = json.loads((logs / f"train_log-{n}.json").read_text())["training"]["throughput"]
    found = re.findall(r"([0-9.]+) samples/s", (logs / f"eval-{n}.log").read_text())
    rows[n] = {"collect_prompts_per_s": coll["prompts"] / coll["seconds"] if coll["seconds"] else None,
               "collect": coll, "train_steps_per_s": train["train_steps_per_s"],
               "eval_samples_per_s": float(found[-1]) if found else None}
(out / "scale.json").write_text(json.dumps(rows, indent=1) + "\n")
base = rows.get(min(rows)) if rows else None
lines = ["| GPUs | collection prompts/s | eff. | training steps/s | eff. | eval samples/s | eff. |",
         "|---|---|---|---|---|---|---|"]
for n, r in rows.items():
    cells = [str(n)]
    for k in ("collect_prompts_per_s", "train_steps_per_s", "eval_samples_per_s"):
        v, b = r[k], base[k] * n / min(rows) if base and base[k] else None
        cells += [f"{v:.3g}" if v else "-", f"{v / b:.0%}" if v and b else "-"]
    lines.append("| " + " | ".join(cells) + " |")
skipped = [n for n in counts if n not in rows]
note = f"\nNot run (too few GPUs): {', '.join(map(str, skipped))} processes.\n" if skipped else ""
(out / "scale.md").write_text("# Scaling over GPUs\n\nCommand: COMMAND.md. Efficiency: rate / (GPUs x the "
                              "smallest count's rate per GPU).\n\n" + "\n".join(lines) + "\n" + note)
print((out / "scale.md").read_text())
EOF
rm -rf "$W"
