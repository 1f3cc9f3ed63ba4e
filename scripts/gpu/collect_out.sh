#!/usr/bin/env bash
# GPU side: what the pipelines (scripts/gpu/start.sh) have made so far, into $OUT, and their progress on stdout.
# At most 8 files of 16 MiB come back a call, so: status.txt; results.tgz (every model's logs, train logs,
# benchmarks, recall; not the rows); rows.tgz (the evaluation rows, $LKV_DIR/MODEL/results/{eval,compare}/);
# module-MODEL.tar (the bf16 module as shipped, with train_log.json). A file over 15 MiB comes back in parts
# (NAME.part00, ...: `cat NAME.part* > NAME` here).
D=${LKV_DIR:-/tmp/lkv} OUT=${OUT:-$D/out}
mkdir -p "$OUT"
put() {  # put FILE: into $OUT, in 15 MiB parts if larger
  if [ "$(stat -c %s "$1")" -gt $(( 15 * 1048576 )) ]; then
    split -b 15M -d -a 2 "$1" "$OUT/$(basename "$1").part" && rm -f "$1"
  else
    mv "$1" "$OUT/"
  fi
}
# a model's folder is one its pipeline started in (gpu.txt), not start.sh's snapshot of the code
results=()
for g in "$D"/*/results/gpu.txt; do [ -f "$g" ] && results+=("$(basename "$(dirname "$(dirname "$g")")")/results"); done
{
  for log in "$D"/lane-*.log; do
    [ -f "$log" ] || continue
    echo "--- $(basename "$log")"
    tr '\r' '\n' < "$log" | awk '/%\|/ { last = $0; next } { print } END { if (last) print last }' \
      | tail -n "${LINES_SHOWN:-30}"
  done
  for r in "${results[@]}"; do
    r=$D/$r
    echo "--- $(basename "$(dirname "$r")") done: $(ls "$r"/*.done 2>/dev/null | xargs -n1 basename 2>/dev/null | paste -sd' ')"
    for f in "$r"/*.log; do  # the newest progress line of every log still being written
      [ -f "$f" ] && [ "$(find "$f" -mmin -1)" ] && echo "  $(basename "$f"): $(tr '\r' '\n' < "$f" | grep '%|' | tail -1)"
    done
  done
  [ -f "$D/deadline" ] && echo "deadline in $(( $(cat "$D/deadline") - $(date +%s) )) s"
} | tee "$OUT/status.txt"
tmp=$(mktemp -d)
if [ ${#results[@]} -gt 0 ]; then
  (cd "$D" && tar czf "$tmp/results.tgz" --exclude='*/results/eval' --exclude='*/results/compare' "${results[@]}")
  put "$tmp/results.tgz"
  rows=()
  for r in "${results[@]}"; do for d in eval compare; do [ -d "$D/$r/$d" ] && rows+=("$r/$d"); done; done
  if [ ${#rows[@]} -gt 0 ]; then (cd "$D" && tar czf "$tmp/rows.tgz" "${rows[@]}") && put "$tmp/rows.tgz"; fi
fi
for m in "$D"/*/work/main_bf16; do
  [ -f "$m/lookahead.json" ] && [ ! -f "$m/BELOW_START" ] || continue  # a warm start below its start stays here
  model=$(basename "$(dirname "$(dirname "$m")")")
  tar cf "$tmp/module-$model.tar" -C "$(dirname "$m")" main_bf16 && put "$tmp/module-$model.tar"
done
rm -rf "$tmp"
ls -la "$OUT"
