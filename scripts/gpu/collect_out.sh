#!/usr/bin/env bash
# GPU side: what scripts/gpu/train_smollm2.sh has finished so far, into $OUT (at most 8 files of 16 MiB come
# back a call): results.tar (logs, benchmark, sweep, ablations, recall), module.tar (the module in fp32 and
# bf16), eval.tar (the evaluation rows). Prints the pipeline's progress.
R=/tmp/lkv/results W=/tmp/lkv/work OUT=${OUT:-/tmp/lkv/out}
mkdir -p "$OUT"
tr '\r' '\n' < /tmp/lkv/pipeline.log | awk '/%\|/ { last = $0; next } { print } END { if (last) print last }' \
  | tail -n "${LINES_SHOWN:-40}"
for f in "$R"/*.log; do  # the newest progress line of every log still being written
  [ -f "$f" ] && [ "$(find "$f" -mmin -1)" ] && echo "$(basename "$f"): $(tr '\r' '\n' < "$f" | grep '%|' | tail -1)"
done
ls "$R"/*.done 2>/dev/null | xargs -n1 basename 2>/dev/null | paste -sd' '
tar cf "$OUT/results.tar" -C /tmp/lkv --exclude=results/eval results 2>/dev/null
[ -f "$W/main_bf16/lookahead.json" ] && tar cf "$OUT/module.tar" -C "$W" --exclude=targets --exclude=checkpoint main main_bf16
[ -d "$R/eval" ] && tar cf "$OUT/eval.tar" -C "$R" eval
ls -la "$OUT"
