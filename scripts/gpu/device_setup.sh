#!/usr/bin/env bash
# GPU side: source this at the start of a `run` command (carry .whl and what scripts/gpu/stage_model.sh planned).
# Sets the environment (LKV_DIR, default /tmp/lkv; LOOKAHEADKV_HOME=$LKV_DIR/home; PYTHONPATH with the tree and
# the gguf wheel), parks every model whose chunks are carried (.gpu/MODEL/chunk.NN + chunks.sha256: assembled,
# sha256-checked and converted once all are in; see stage_model.sh) and every other file carried in .gpu/ (.xz
# ones decompressed), all in $LKV_DIR, which stays while the machine is warm. Prints one status line a model.
export LKV_DIR=${LKV_DIR:-/tmp/lkv}
_lkv_setup() {  # a function, so that sourcing leaves no variable of its own in the caller's shell
  local f m
  export LKV_ENV=1 LOOKAHEADKV_HOME=${LOOKAHEADKV_HOME:-$LKV_DIR/home} PYTHONUNBUFFERED=1
  # lanes share the GPU: without expandable segments the collection's shrinking batches left the allocator
  # holding twice what it used (135 GB reserved for 66 GB allocated, 2026-12-02)
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  mkdir -p "$LKV_DIR" "$LOOKAHEADKV_HOME/downloads"
  python3 -c "import gguf" 2>/dev/null || [ -z "$(ls .whl/gguf-*.whl 2>/dev/null)" ] \
    || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl
  unxz_to() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$@"; }
  for f in .gpu/*; do
    [ -f "$f" ] || continue
    case "$f" in
      *.xz) [ -f "$LKV_DIR/$(basename "$f" .xz)" ] || unxz_to "$f" "$LKV_DIR/$(basename "$f" .xz)" ;;
      *) cp "$f" "$LKV_DIR/" ;;
    esac
  done
  # shellcheck source=scripts/gpu/stage_model.sh
  source scripts/gpu/stage_model.sh
  for m in .gpu/*/chunks.sha256; do [ -f "$m" ] && _lkv_park "$(basename "$(dirname "$m")")"; done
  for f in "$LKV_DIR"/*.xz; do  # a file that came in chunks, assembled
    [ -f "$f" ] && [ ! -f "${f%.xz}" ] && unxz_to "$f" "${f%.xz}"
  done
  ls "$LKV_DIR"
}
_lkv_setup
unset -f _lkv_setup unxz_to
