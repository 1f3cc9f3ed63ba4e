#!/usr/bin/env bash
# The next lease, planned on 2026-12-07 (no machine was lent that day; rehearsed on the CPU): the 1.5B's module
# trained afresh on prompts with UUID records (its whole RULER 4K gap to SpecKV is niah_multikey_3, where its
# scores missed random keys), then its lookahead rows at 4K/8K x25 and 16K x10 (issue 13); beside the 1.5B's
# staging, the collector's decode A/B on SmolLM2 (scripts/gpu/ab_decode.py: issue 11's collection target), which
# the 1.5B's stages wait for (knobs.env). QWEN=0: the A/B alone.
# Ran 2026-12-07 22:49-23:12 on an H100 (after two refused starts, 361 s): the 28 calls took 20-40 s each, not
# 13, so the knobs were cut on the way (TARGETS_LIMIT=170 MAIN_LIMIT=220, appended to knobs.env) and the stages
# after `main` did not fit: the A/B (results/train/smollm2_h100/ab_decode_2026-12-07/) and the module's training
# (results/train/qwen2.5-coder-1.5b-instruct_h100/runs/2026-12-07_uuid/) came back, no RULER rows. On a 30-minute
# budget the 1.5B's transfer (~10 min) leaves room for training OR its RULER rounds, not both.
#   CPU, before: `CHUNK_MIB=44 bash scripts/gpu/stage.sh qwen` (prompts with the UUID records, samples, chunks),
#     `CHUNK_MIB=44 bash scripts/gpu/stage_model.sh split smollm2-135m-instruct`, the bench prompts (stage.sh
#     smollm2's second `lkv prompts`, xz'd), and the calls: `bash scripts/gpu/stage_model.sh plan
#     smollm2-135m-instruct -- .gpu/prompts_bench.safetensors.xz > .gpu/calls-lease.txt; head -25
#     .gpu/calls-qwen.txt >> .gpu/calls-lease.txt` (3 + 25 calls with the shipped modules' weights out of the
#     index for the lease: `git rm --cached` and .git/info/exclude, as stage.sh's header says; restored after).
#   every call, back to back: run(carry=LINE, command="LEASE_LEFT=S bash scripts/gpu/lease_q15_uuid.sh"), S read
#     once (the first call): ~1,400 s on a fresh 30-minute budget (targets 270 s, training 420 s, eval to the end)
#   then: `bash scripts/gpu/wait_for.sh qwen2.5-coder-1.5b-instruct:main 540`, and the same for :eval, the last
#     with `cp /tmp/lkv/ab/* $OUT/`; CPU after: `python scripts/gpu/unpack.py FILES_AT --run NAME`.
source scripts/gpu/device_setup.sh > /dev/null
D=$LKV_DIR
[ -f "$D/knobs.env" ] || cat > "$D/knobs.env" <<'EOK'
while [ -f /tmp/lkv/ab.pid ] && kill -0 "$(cat /tmp/lkv/ab.pid)" 2>/dev/null; do sleep 2; done
case $MODEL in
  qwen2.5-coder-1.5b-*) TARGETS_LIMIT=270 MAIN_LIMIT=420 EVALS=4 EVAL_LIMIT=600
    EVAL_PLAN="4096:ruler,qa:25:q15_4k;8192:ruler:25:q15_8k;16384:ruler:10:q15_16k" ;;
esac
EOK
if [ "${QWEN:-1}" = 1 ]; then
  LEASE_LEFT=${LEASE_LEFT:-1400} bash scripts/gpu/start.sh "qwen2.5-coder-1.5b-instruct:targets,main,bf16,eval"
elif [ ! -d "$D/code" ]; then  # the A/B alone: its snapshot of the code
  mkdir -p "$D/code.tmp" && cp -r lookaheadkv scripts "$D/code.tmp/" && mv "$D/code.tmp" "$D/code"
fi
if [ ! -f "$D/ab.pid" ] && [ -f "$LOOKAHEADKV_HOME/models/smollm2-135m-instruct/.complete" ] && [ -f "$D/prompts_bench.safetensors" ]; then
  (cd "$D/code" && PYTHONPATH="$D/code:/tmp/site" setsid nohup bash -c "echo \$\$ > '$D/ab.pid'; exec python3 scripts/gpu/ab_decode.py \
    --prompts '$D/prompts_bench.safetensors' --out '$D/ab'" > "$D/ab.log" 2>&1 < /dev/null &)
  sleep 1
fi
[ -f "$D/ab.log" ] && echo "ab: $(tail -c 300 "$D/ab.log" | tr '\r' '\n' | tail -1)"
bash scripts/gpu/stage_model.sh status smollm2-135m-instruct qwen2.5-coder-1.5b-instruct 2>/dev/null | tail -2
true
