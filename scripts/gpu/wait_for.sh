#!/usr/bin/env bash
# GPU side: `bash scripts/gpu/wait_for.sh STAGE SECONDS`: wait until train_smollm2.sh has finished STAGE (or the
# whole pipeline, or SECONDS have passed), then show what is done (scripts/gpu/collect_out.sh).
R=/tmp/lkv/results
end=$(( $(date +%s) + ${2:-540} ))
while [ "$(date +%s)" -lt "$end" ] && [ ! -f "$R/$1.done" ] && ! grep -q "== pipeline finished" /tmp/lkv/pipeline.log 2>/dev/null; do
  sleep 5
done
bash scripts/gpu/collect_out.sh
