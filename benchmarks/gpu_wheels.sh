#!/usr/bin/env bash
# Wheels the lent GPU machines lack (Python 3.12, torch 2.11 there), into .whl/ (git-ignored):
# torchcodec, for jpeg_decode="device" (nvJPEG); openslide-python, openslide-bin and scipy for the
# slide pipeline (slide_pipeline.py); simplejpeg, tifffile, imagecodecs for the stored-tile reader (slide_read.py). See benchmarks/gpu.sh for how they travel.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d .whl "torchcodec==0.16.0" \
    "openslide-python==1.4.7" "openslide-bin==4.0.1.2" "scipy==1.17.1" \
    "simplejpeg==1.9.0" "tifffile==2026.3.3" "imagecodecs==2026.3.6"   # torchcodec 0.16: first with images; the last three: slide_read.py
ls -la .whl
