#!/usr/bin/env bash
# GPU side: the default model on RULER 4K + long-document QA, then RULER 8K, then essay fidelity, every method
# that exists x budgets 32..512, 50 samples per task, in one call that ends inside 10 minutes.
# Samples are made on the CPU machine beforehand (the GPU machine has no data sets):
#   lookaheadkv eval --tasks ruler,qa,fidelity --n 50 --length 4096 --samples .gpu/eval_samples_4k.jsonl.gz --only-samples
#   lookaheadkv eval --tasks ruler --n 50 --length 8192 --samples .gpu/eval_samples_8k.jsonl.gz --only-samples
# Staging: `bash scripts/gpu/stage.sh smollm2` (CPU) makes them with the model's chunks and plans the calls
# (.gpu/calls-smollm2.txt); every call but the last: command `source scripts/gpu/device_setup.sh`, the last:
# command `bash scripts/gpu/eval_smollm2.sh` (it sources device_setup.sh too).
# Rows are appended to $OUT/*.jsonl one flushed line each (gzipped at the end), so a run cut short still returns
# what it did;
# the three runs (4K RULER + QA, 8K RULER, 4K fidelity) go in turn inside EVAL_SECONDS (default 470), each
# stopping between batches.
set -uo pipefail
source scripts/gpu/device_setup.sh
OUT=${OUT:-/tmp/lkv/out}
mkdir -p "$OUT"
# Resume: rows already committed are copied in and skipped, so each call adds to them and returns the whole file.
# (Kept gzipped in the repo: a file coming back may hold 16 MiB, and the tree that travels must stay small.)
# A later call on the same warm machine resumes from this machine's own copy (/tmp/lkv/rows), newer than the repo's.
mkdir -p /tmp/lkv/rows
for f in results/eval/smollm2_*.jsonl.gz; do
  [ -f "/tmp/lkv/rows/$(basename "$f")" ] || cp "$f" /tmp/lkv/rows/
done
for f in /tmp/lkv/rows/smollm2_*.jsonl.gz; do
  [ -f "$f" ] && gunzip -c "$f" > "$OUT/$(basename "$f" .gz)"
done
for f in .gpu/eval_samples_*.jsonl.gz; do [ -f "$f" ] && cp "$f" /tmp/lkv/; done
S=$(ls /tmp/lkv/eval_samples_*.jsonl.gz | paste -sd,)
echo "samples: $S"
export TQDM_MININTERVAL=20
T0=$(date +%s)
TOTAL=${EVAL_SECONDS:-470}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# One process (one CUDA start, one model load) runs the three evaluations in turn.
ls lookaheadkv/modules 2>/dev/null || echo "no lookahead module shipped"
# EVAL_PLAN: runs in turn, "LENGTH:TASKS:NAME;..." (tasks in the order wanted: a time limit stops the later ones)
PLAN=${EVAL_PLAN:-4096:ruler,qa:smollm2_4k;8192:ruler:smollm2_8k;4096:fidelity:smollm2_fidelity_4k}
timeout $(( TOTAL + 60 )) python3 - "$S" "$OUT" "$TOTAL" "$PLAN" <<'EOF' 2>&1 | tr '\r' '\n' | tee "$OUT/eval.log"
import os, sys, time
import torch
from lookaheadkv.evaluation import runner
from lookaheadkv.methods import METHODS, parse_methods
from lookaheadkv.models import load_model

samples = {k: v for f in sys.argv[1].split(",") for k, v in runner.load_samples(f).items()}
out, total = sys.argv[2], float(sys.argv[3])
print(len(samples), "samples", flush=True)
# SpecKV drafts with the target itself: no smaller model shares SmolLM2's tokenizer. Its draft is then the
# full cache's own answer, an upper bound for draft-based selection (its cost is not SpecKV's).
spec = ",".join(m for m in METHODS if m != "speckv") + ",speckv:draft_model=smollm2-135m-instruct"
print("methods:", spec, flush=True)
model, tok = load_model("smollm2-135m-instruct", device="cuda", dtype=torch.float32)
t0 = time.perf_counter()
# In order of importance; each stops between batches once the time is spent (a batch of 50 at 8K takes up
# to ~1 min, hence the margin), and a rerun resumes where it stopped.
for length, tasks, name in (run.split(":") for run in sys.argv[4].split(";")):
    length = int(length)
    left = total - (time.perf_counter() - t0) - 45
    if left < 20:
        print(f"skipped {name}: {left:.0f} s left", flush=True)
        continue
    t = time.perf_counter()
    rows = runner.run_eval(model, tok, tasks, parse_methods(spec), [32, 64, 128, 256, 512], 50, length,
                           f"{out}/{name}.jsonl", model_name="smollm2-135m-instruct", batch=int(os.environ.get("EVAL_BATCH", 50)), time_limit=left,
                           samples=samples)
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - t:.0f} s (limit {left:.0f} s); peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
EOF
wc -l "$OUT"/*.jsonl
gzip -f "$OUT"/*.jsonl
cp "$OUT"/smollm2_*.jsonl.gz /tmp/lkv/rows/
echo "eval seconds: $(( $(date +%s) - T0 ))"
