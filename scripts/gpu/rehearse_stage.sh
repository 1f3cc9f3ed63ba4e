#!/usr/bin/env bash
# CPU rehearsal of scripts/gpu/stage_model.sh: `bash scripts/gpu/rehearse_stage.sh MODEL [FILE...]` splits MODEL
# (and plans FILEs beside it), then plays each planned device call here: a fresh copy of the tree (hard links)
# holding only that call's carried paths, `source scripts/gpu/device_setup.sh` in it, one LKV_DIR for all calls
# (the warm machine's /tmp/lkv). The first call is played once more at the end (its chunks must be skipped); the
# last waits for the conversion. Leaves LKV_DIR (printed) for a look; LKV_CONVERT=0 stops at the assembly.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=$1; shift
bash scripts/gpu/stage_model.sh split "$model"
files=()
[ $# -gt 0 ] && files=(-- "$@")
mapfile -t calls < <(bash scripts/gpu/stage_model.sh plan "$model" "${files[@]}")
export LKV_DIR=${LKV_DIR:-$(mktemp -d /tmp/lkv-rehearsal.XXXXXX)}
unset LOOKAHEADKV_HOME LKV_ENV
echo "LKV_DIR=$LKV_DIR; ${#calls[@]} calls"
play() {  # play N CARRY_JSON: one simulated device call
  local tree
  tree=$(mktemp -d "$LKV_DIR/../call.XXXXXX")
  cp -al --parents -t "$tree" lookaheadkv scripts  # this checkout's code, committed or not
  for p in $(python3 -c "import json, sys; print(' '.join(json.loads(sys.argv[1])))" "$2"); do
    cp -al --parents -t "$tree" "$p"
  done
  echo "== call $1: $2"
  (cd "$tree" && LKV_WAIT=${3:-0} PYTHON=${PYTHON:-python3} bash -c 'source scripts/gpu/device_setup.sh' | grep ': ' || true)
  rm -rf "$tree"
}
for i in "${!calls[@]}"; do
  last=0
  [ "$i" = $(( ${#calls[@]} - 1 )) ] && last=1
  [ "$last" = 1 ] && play "again 0" "${calls[0]}"  # a call repeated: nothing parked twice
  play "$i" "${calls[$i]}" "$last"
done
bash scripts/gpu/stage_model.sh status "$model"
