#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch 2.13.0 installed BEFORE anything that
# could pull another torch, then deqppl in editable mode with the given extras.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[${extras}]"
