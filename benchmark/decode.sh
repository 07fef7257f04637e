#!/usr/bin/env bash
# End-to-end decode, dense vs sparse at 0/0.25/0.4/0.5/0.65, one named config with random weights
# (default llama-3-8b, bf16, 5-token prompt, 200 new tokens, CUDA graphs).
# Writes benchmark/results/decode-<model>-<device>.json and .png.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m benchmark.bench_decode --model "${1:-llama-3-8b}" --out "${OUT_DIR:-benchmark/results}" "${@:2}"
