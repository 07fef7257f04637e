#!/usr/bin/env bash
# Kernel sweep: sparse GEMV vs cuBLAS and torch.compile at Llama-3-8B/70B decode shapes, bf16 and fp16.
# Writes benchmark/results/gemv-<device>.json and .png.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m benchmark.bench_gemv --dtypes bfloat16 float16 --out "${OUT_DIR:-benchmark/results}" "$@"
