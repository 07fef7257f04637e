#!/usr/bin/env bash
# Tensor-parallel decode of llama-3-70b (random weights, bf16) at TP2 and TP4, dense vs 0.5 sparse.
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for tp in ${TP_SIZES:-2 4}; do
  torchrun --standalone --nproc_per_node="$tp" -m benchmark.bench_decode --model "${MODEL:-llama-3-70b}" \
    --sparsities 0.5 --out "${OUT_DIR:-benchmark/results}" "$@"
done
