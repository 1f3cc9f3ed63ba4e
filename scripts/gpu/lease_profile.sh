#!/usr/bin/env bash
# A short lease planned on 2026-12-08 (no machine was lent that day: five starts refused, then loans paused), for
# the questions the CPU cannot answer. Needs SmolLM2 only (3 calls of chunks), ~15 min of device time:
#   profile  scripts/gpu/profile_host.py: is the single-pass adapter's ~12 ms at 8K (paired TTFT, issue 12) host
#            work exposed, and by what; how host-bound is a training step (issue 11); Llama-3.1-8B and SmolLM2
#            shapes with random weights: it needs no staged model, so it runs in the first call (~4 min)
#   ab       scripts/gpu/ab_decode.py --reference 256: which of the collector's two bf16 decode paths strays from
#            fp32 (they agreed on 57.5% of the greedy responses on 2026-12-07) (~4 min)
#   share    RULER 4K, `lookahead` beside `lookahead:share=S` (Lookahead.share: each head's scores plus S x their
#            mean over all layers and heads) at B=64/128: first on validation samples (seed 1, 20 a task), then
#            on the 650 test samples the README reports, paired with the committed LAQ rows (~6 min)
# CPU, before (~3 min): `bash scripts/setup.sh`; `CHUNK_MIB=44 bash scripts/gpu/stage_model.sh split
#   smollm2-135m-instruct`; the bench prompts (stage.sh smollm2's second `lkv prompts`, xz'd); the samples:
#   `lkv eval --tasks ruler --n 50 --length 4096 --samples .gpu/eval_samples_4k.jsonl.gz --only-samples` and the
#   same with `--n 20 --seed 1 --samples .gpu/eval_samples_4k_val.jsonl.gz`; the shipped modules' weights out of
#   the index for the lease (stage.sh's header); `bash scripts/gpu/stage_model.sh plan smollm2-135m-instruct --
#   .gpu/prompts_bench.safetensors.xz .gpu/eval_samples_4k.jsonl.gz .gpu/eval_samples_4k_val.jsonl.gz`.
# Calls, back to back (each within 30 s of the last):
#   run(carry=LINE 1, command="source scripts/gpu/device_setup.sh; bash scripts/gpu/lease_profile.sh profile")
#   run(carry=LINE 2, command="source scripts/gpu/device_setup.sh")
#   run(carry=LINE 3, command="source scripts/gpu/device_setup.sh; bash scripts/gpu/lease_profile.sh ab")
#   run(command="source scripts/gpu/device_setup.sh; bash scripts/gpu/lease_profile.sh share")
# CPU, after: the files under results/bench/profile_<date>/, results/train/<card>/ab_decode_<date>/ and
#   results/eval/share_<date>/ with a COMMAND.md each.
set -uo pipefail
[ -n "${LKV_ENV:-}" ] || source scripts/gpu/device_setup.sh > /dev/null
lkv() { python3 -c "from lookaheadkv.cli import main; main()" "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
case "${1:-}" in
  profile) timeout 420 python3 scripts/gpu/profile_host.py --out "$OUT" 2>&1 | tail -40 ;;
  ab)
    for _ in $(seq 180); do  # the conversion the last chunk started (~30 s)
      [ -f "$LOOKAHEADKV_HOME/models/smollm2-135m-instruct/.complete" ] && break; sleep 1
    done
    bash scripts/gpu/stage_model.sh status smollm2-135m-instruct
    timeout 500 python3 scripts/gpu/ab_decode.py --prompts "$LKV_DIR/prompts_bench.safetensors" --out "$OUT" \
      --reference 256 2>&1 | tail -20 ;;
  share)
    methods=${SHARE_METHODS:-lookahead,lookahead:share=0.25,lookahead:share=1.0}
    common=(--tasks ruler --length 4096 --methods "$methods" --budgets 64,128 --batch 25 --device cuda --dtype bfloat16)
    timeout 200 lkv eval "${common[@]}" --n 20 --seed 1 --samples "$LKV_DIR/eval_samples_4k_val.jsonl.gz" \
      --time-limit 150 --out "$OUT/val_4k.jsonl" 2>&1 | tail -3
    timeout 360 lkv eval "${common[@]}" --n 50 --samples "$LKV_DIR/eval_samples_4k.jsonl.gz" --time-limit 300 \
      --out "$OUT/test_4k.jsonl" 2>&1 | tail -3
    gzip -f "$OUT"/*.jsonl ;;
  *) echo "usage: lease_profile.sh profile|ab|share" >&2; exit 2 ;;
esac
