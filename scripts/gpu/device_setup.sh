#!/usr/bin/env bash
# GPU side: source this at the start of a `run` command (carry .whl, and one .gpu/smollm2.partN a call).
# Parts of SmolLM2's GGUF (three, see stage.sh) are parked in /tmp/lkv as they arrive; once all are there it is
# assembled, checked by sha256 and converted (lookaheadkv models fetch), all kept while the machine is warm.
# Other files carried in .gpu/ (prompt files, samples) are parked in /tmp/lkv too, .xz ones decompressed.
export LOOKAHEADKV_HOME=/tmp/lkv/home PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p /tmp/lkv/home/downloads
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl
for p in .gpu/smollm2.part*; do [ -f "$p" ] && cp "$p" /tmp/lkv/; done
for f in .gpu/*; do
  case "$f" in
    *.part*) ;;
    *.xz) [ -f "/tmp/lkv/$(basename "$f" .xz)" ] || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$f" "/tmp/lkv/$(basename "$f" .xz)" ;;
    *) [ -f "$f" ] && cp "$f" /tmp/lkv/ ;;
  esac
done
g=/tmp/lkv/home/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f /tmp/lkv/home/models/smollm2-135m-instruct/.complete ] && [ -f /tmp/lkv/smollm2.part0 ] && [ -f /tmp/lkv/smollm2.part1 ] && [ -f /tmp/lkv/smollm2.part2 ]; then
  cat /tmp/lkv/smollm2.part0 /tmp/lkv/smollm2.part1 /tmp/lkv/smollm2.part2 > "$g"
  python3 -c "from lookaheadkv.models import fetch; print(fetch('smollm2-135m-instruct'))"
fi
ls /tmp/lkv
