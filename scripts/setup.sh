#!/usr/bin/env bash
# Create .venv (once) with torch 2.13.0 first, so pip takes this machine's local CPU wheel rather than
# downloading a multi-GB CUDA build, then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import lookaheadkv, torch, transformers, peft" # fail loudly if the install did not take
