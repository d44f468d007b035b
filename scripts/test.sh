#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests and tutorials included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh test
. .venv/bin/activate
python -m pytest "$@"
