#!/usr/bin/env bash
# A short lease planned on 2026-12-08 (no machine was lent that day: five starts refused, then loans paused), for
# the questions the CPU cannot answer. Needs SmolLM2 only (3 calls of chunks), ~10 min of device time:
#   profile  scripts/gpu/profile_host.py: is the single-pass adapter's ~12 ms at 8K (paired TTFT, issue 12) host
#            work exposed, and by what; how host-bound is a training step (issue 11); Llama-3.1-8B and SmolLM2
#            shapes with random weights: it needs no staged model, so it runs in the first call (~4 min)
#   ab       scripts/gpu/ab_decode.py --reference 256: which of the collector's two bf16 decode paths strays from
#            fp32 (they agreed on 57.5% of the greedy responses on 2026-12-07) (~4 min)
#   graphs   train.py --cuda-graphs (lookaheadkv/graphed_step.py): profile_host.py's training part also runs
#            the graphed steps (steps/s both ways, and the two runs' losses side by side), in `profile`
# CPU, before (~3 min): `bash scripts/setup.sh`; `CHUNK_MIB=44 bash scripts/gpu/stage_model.sh split
#   smollm2-135m-instruct`; the bench prompts (stage.sh smollm2's second `lkv prompts`, xz'd); the
#   shipped modules' weights out of the index for the lease (stage.sh's header); `bash
#   scripts/gpu/stage_model.sh plan smollm2-135m-instruct -- .gpu/prompts_bench.safetensors.xz`.
# Calls, back to back (each within 30 s of the last):
#   run(carry=LINE 1, command="source scripts/gpu/device_setup.sh; bash scripts/gpu/lease_profile.sh profile")
#   run(carry=LINE 2, command="source scripts/gpu/device_setup.sh")
#   run(carry=LINE 3, command="source scripts/gpu/device_setup.sh; bash scripts/gpu/lease_profile.sh ab")
# CPU, after: the files under results/bench/profile_<date>/ and results/train/<card>/ab_decode_<date>/, with
#   a COMMAND.md each. (A third part, RULER rows of `lookahead:share=S`, was dropped: on the CPU it lost,
#   results/eval/cpu_share_2026-12-08/.)
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
  *) echo "usage: lease_profile.sh profile|ab" >&2; exit 2 ;;
esac
