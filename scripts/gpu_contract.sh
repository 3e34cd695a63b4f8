#!/usr/bin/env bash
# Run the adapter contract table (every registered family) on a CUDA GPU.
# Usage: scripts/gpu_contract.sh   (from the repository root, with the package installed)
set -euo pipefail
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
BONSAI_TEST_DEVICE=cuda exec python -m pytest -q tests/test_adapter_contract.py "$@"
