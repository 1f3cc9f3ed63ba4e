#!/usr/bin/env bash
# The default test run: set up, lint, every test on the current transformers, then the tiny-model tests
# again on transformers 5.17 (the GPU machine's version) in a second environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check lookaheadkv tests scripts
python -m pytest -q
deactivate
TRANSFORMERS_VERSION=5.17.0 VENV=.venv-tf517 bash scripts/setup.sh
. .venv-tf517/bin/activate
python -m pytest -q -m "not slow"
