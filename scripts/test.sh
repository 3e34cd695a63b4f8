#!/usr/bin/env bash
# Install (with test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/env.sh
ruff check src tests
python -m pytest -q --durations=15 "$@"
