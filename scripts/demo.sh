#!/usr/bin/env bash
# The main job: set up, then the demo on the embedded default model (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lookaheadkv demo "$@"
