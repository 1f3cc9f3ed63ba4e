#!/usr/bin/env bash
# Create a virtual environment (once; $VENV, default .venv) with torch 2.13.0 first, so pip takes this
# machine's local CPU wheel rather than a multi-GB CUDA build, then the package with its test extras.
# --no-compile: pip would byte-compile all of torch (~20 s a venv); Python compiles what it imports.
# TRANSFORMERS_VERSION pins transformers (the tests run on 5.17 and on the current release).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
quiet python -m pip install -q --disable-pip-version-check --no-compile "torch==2.13.0"
quiet python -m pip install -q --disable-pip-version-check --no-compile -e ".[test]" ${TRANSFORMERS_VERSION:+"transformers==$TRANSFORMERS_VERSION"}
python -c "import lookaheadkv, torch, transformers, peft; print('lookaheadkv', lookaheadkv.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
