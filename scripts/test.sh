#!/usr/bin/env bash
# The default test run: set up, lint, then every test (the slow ones use the real default model,
# fetched and converted once into $LOOKAHEADKV_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check lookaheadkv tests
python -m pytest -q
