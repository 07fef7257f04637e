#!/usr/bin/env bash
# Decode sweep over several named configs (random weights), one JSON and plot per model.
set -euo pipefail
cd "$(dirname "$0")/.."
for model in ${MODELS:-llama-3-8b llama-2-7b mistral-7b}; do
  "${PYTHON:-python}" -m benchmark.bench_decode --model "$model" --out "${OUT_DIR:-benchmark/results}" "$@"
done
