#!/usr/bin/env bash
# Every benchmark on CUDA in one run (budget: under 8 minutes on one H100), then the GPU tests.
#   bash benchmarks/gpu.sh 2>&1 | tee gpu-results.txt
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python model_only.py --device cuda --precisions fp16 bf16 fp32 --batch-sizes 64 128 256 512
python model_only.py --device cuda --precisions fp16 --batch-sizes 256 --compile
python end_to_end.py --device cuda --tiles 4096 --formats png:224 jpg:224 png:256
python end_to_end.py --device cuda --tiles 4096 --formats jpg:224 --jpeg-decode device
python precision_parity.py --device cuda --tiles 64
python memory.py --device cuda --model h0_mini --tiles 20000
python -m pytest ../tests -m gpu -q -p no:cacheprovider
