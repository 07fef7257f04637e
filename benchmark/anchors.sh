#!/usr/bin/env bash
# GPT-Fast's dense model and TEAL's sparse code beside this project's, from your own clones of the two repositories:
#   git clone https://github.com/pytorch-labs/gpt-fast ~/src/gpt-fast
#   git clone https://github.com/FasterDecoding/TEAL ~/src/TEAL      # its kernels need `pip install msgspec`
#   bash benchmark/anchors.sh ~/src/gpt-fast ~/src/TEAL [--models llama-3-8b ...]
# Writes benchmark/results/anchors-<device>.json and .png.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash benchmark/anchors.sh GPT_FAST_CLONE TEAL_CLONE [benchmark.anchors options]" >&2
  exit 2
fi
gpt_fast=$1 teal=$2
shift 2
python -m benchmark.anchors --gpt_fast "$gpt_fast" --teal "$teal" "$@"
