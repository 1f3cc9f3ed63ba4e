#!/usr/bin/env bash
# GPU side: `bash scripts/gpu/wait_for.sh MODEL:STAGE SECONDS`: wait until the pipeline of MODEL has finished STAGE
# (or every lane of scripts/gpu/start.sh has ended, or SECONDS have passed), then put what is done into $OUT
# (scripts/gpu/collect_out.sh). MODEL defaults to smollm2-135m-instruct.
D=${LKV_DIR:-/tmp/lkv}
item=${1:-all}
model=${item%%:*} stage=${item#*:}
[ "$model" = "$item" ] && model=smollm2-135m-instruct
end=$(( $(date +%s) + ${2:-540} ))
running() {
  local p
  for p in "$D"/lane-*.pid; do [ -f "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null && return 0; done
  return 1
}
while [ "$(date +%s)" -lt "$end" ] && [ ! -f "$D/$model/results/$stage.done" ] && running; do
  sleep 5
done
bash "$(dirname "$0")/collect_out.sh"
