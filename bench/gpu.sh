#!/usr/bin/env bash
# The benchmark on one GPU: ResNet-50 at 224 x 224, JPEG shards (decoded on the GPU by vog_ray),
# the limit, the hand-written baseline and vog_ray side by side, then bf16, compile and vmap.
# Usage: bench/gpu.sh [N] [K] [extra bench/run.py options]; N = 20000 and K = 5 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
K=${2:-5}
shift $(( $# > 2 ? 2 : $# ))
make setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} .venv/bin/python bench/run.py \
  --device cuda --model resnet50 --image-size 224 --format jpg --batch-size 128 \
  --n "$N" --k "$K" --variants --out out/bench-gpu "$@"
