#!/usr/bin/env bash
# Install (with test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/env.sh
# optional parts whose tests are quick: a local Ray cluster, LoRA recovery (peft), lm-eval;
# the llama.cpp tests skip with a reason unless that extra (a 10-minute build) is installed
pip install -q -e ".[test,ray,recover,lmeval]"
ruff check src tests
python -m pytest -q --durations=15 "$@"
