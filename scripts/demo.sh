#!/usr/bin/env bash
# Set up (if needed) and run the main job on built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh test
. .venv/bin/activate
deqppl compare "$@"
