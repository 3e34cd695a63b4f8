#!/usr/bin/env bash
# Run, or resume, the second study (results/study.yaml) in the background; log: runs/study.log.
# Cached cells are skipped, a killed prune or recovery resumes where it can. The dense parent's
# GSM8K-train solutions that every recovery distils on take ~20 min to generate: a copy kept in
# results/study/self_data/ seeds the package's cache, so a fresh checkout does not redo them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cache="${BONSAI_PRUNE_CACHE:-$HOME/.cache/bonsai_prune}/self_data"
mkdir -p "$cache" runs
for saved in results/study/self_data/*.jsonl; do
  if [ -e "$saved" ] && [ ! -e "$cache/$(basename "$saved")" ]; then cp "$saved" "$cache/"; fi
done
nohup bonsai-prune experiment results/study.yaml "$@" > runs/study.log 2>&1 &
echo "study running in the background (pid $!): tail -f runs/study.log"
