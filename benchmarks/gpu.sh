#!/usr/bin/env bash
# Every benchmark on CUDA in one run (budget: under 8 minutes on one H100), then the GPU tests.
#   bash benchmarks/gpu.sh 2>&1 | tee gpu-results.txt
# On a lent GPU machine (python3 there has torch, timm, h5py, safetensors; nothing can be fetched):
#   here, once:  bash benchmarks/gpu_wheels.sh          (torchcodec for nvJPEG, into .whl/)
#   there:       run with carry [".whl"] and the command
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#       PYTHONPATH=/tmp/site bash benchmarks/gpu.sh 2>&1 | tee $OUT/gpu-results.txt
# Not run here: benchmarks/onnx_runtime.py. h0mini's ONNX path uses ONNX Runtime's CPU provider only
# (onnxruntime-gpu and its CUDA execution provider are not installed, nor available on the lent machine),
# and on a GPU torch fp16 is the fast path; the ONNX export targets CPU-only and non-Python deployments.
# Dry run, on any machine (a CPU does): bash benchmarks/gpu.sh --dry-run
#   checks that the script parses and runs the slide-reading (#25) line with its own flags, on the CPU
#   with tiny sizes (--smoke, h0mini_test, fp32 appended: argparse keeps the last value).
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # h0mini from this checkout, installed or not
PY="${PYTHON:-python3}"
DRY=()
[[ "${1:-}" == "--dry-run" ]] && DRY=(--device cpu --precision float32 --model h0mini_test --smoke)

# Slide reading (#25): 40x pyramid -> features with H0-mini (random weights) at fp16, batch 256, 16 workers:
# OpenSlide read_region vs stored tiles vs stored tiles decoded on the GPU (nvJPEG), and the consumer side
# alone (tiles pre-read); tiles/s, MFU, slides/hour for a 15,000-tile slide, GPU-decoded pixels vs the CPU
# path. Needs simplejpeg, tifffile, imagecodecs, openslide (.whl).
slide_read() {
  "$PY" slide_read.py --device cuda --model h0_mini --workers 16 --batch-size 256 --precision float16 \
      --repeat 4 --overlap 0 --rounds 2 --gpu-decode --skip-cc0 --rss-reads 500 "${DRY[@]}"
}
if [[ ${#DRY[@]} -gt 0 ]]; then
  bash -n "$SCRIPT" && echo "gpu.sh parses"
  slide_read
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
"$PY" model_only.py --device cuda --precisions fp16 bf16 fp32 --batch-sizes 64 128 256 512
"$PY" model_only.py --device cuda --precisions fp16 --batch-sizes 256 --compile
"$PY" end_to_end.py --device cuda --tiles 4096 --formats png:224 jpg:224 png:256
"$PY" end_to_end.py --device cuda --tiles 4096 --formats jpg:224 --jpeg-decode device
"$PY" precision_parity.py --device cuda --tiles 64
"$PY" memory.py --device cuda --model h0_mini --tiles 20000
"$PY" slide_pipeline.py --device cuda --overlap 192 --rounds 3   # needs openslide-python + openslide-bin (.whl)
slide_read
"$PY" cohort.py --device cuda --slides 300 --overhead-slides 50 --efficiency-slides 50 --tiles-per-side 4 --batch-size 256 --num-workers 15
"$PY" distill_step.py --teacher h_optimus_0 --student h0_mini --batch 32 --global-size 224 --local-size 98 --device cuda
"$PY" plism_scale.py --device cuda --tiles 4096,8139 --check-slides 4
"$PY" -m pytest ../tests/test_embed.py ../tests/test_jpeg.py ../tests/test_eval_plism.py -m gpu -q -p no:cacheprovider
