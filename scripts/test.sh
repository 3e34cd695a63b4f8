#!/usr/bin/env bash
# Install (with test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/env.sh
# optional parts whose tests are quick: a local Ray cluster, LoRA recovery (peft); the
# llama.cpp and lm-eval tests skip with a reason unless those extras are installed by hand
pip install -q -e ".[test,ray,recover]"
ruff check src tests
python -m pytest -q --durations=15 "$@"
