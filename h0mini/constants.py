"""Facts about H0-mini and its teachers that every module shares.

Sources: the H0-mini paper (arXiv 2501.16239) and the public model cards of
``bioptimus/H0-mini`` and ``bioptimus/H-optimus-0``.
"""

from __future__ import annotations

H0_MINI_REPO_ID = "bioptimus/H0-mini"
H_OPTIMUS_0_REPO_ID = "bioptimus/H-optimus-0"
H_OPTIMUS_1_REPO_ID = "bioptimus/H-optimus-1"
HUB_URL = "https://huggingface.co"

# Names under which ``import h0mini`` registers the architectures with timm.
H0_MINI_ARCH = "h0_mini"
H_OPTIMUS_0_ARCH = "h_optimus_0"
H_OPTIMUS_1_ARCH = "h_optimus_1"
TEST_ARCH = "h0mini_test"

# Known Hub repos are always built with h0mini's architecture (whatever their config.json names),
# so the SwiGLU layers that a config.json cannot express are never missed.
REPO_ARCHS = {
    H0_MINI_REPO_ID: H0_MINI_ARCH,
    H_OPTIMUS_0_REPO_ID: H_OPTIMUS_0_ARCH,
    H_OPTIMUS_1_REPO_ID: H_OPTIMUS_1_ARCH,
}

# Hub layout of a timm checkpoint.
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
# Written by `h0mini download --local-dir` beside the files: the repo id and commit they came from.
SOURCE_NAME = "h0mini_source.json"

# H-optimus-0 normalisation, shared by H0-mini (not ImageNet's).
MEAN = (0.707223, 0.578729, 0.703617)
STD = (0.211883, 0.230117, 0.177517)

# Preprocessing. The literal Hub config.json could not be checked; bicubic with
# crop_pct 1.0 (resize the whole tile, crop nothing) is the documented choice.
# When a Hub config.json carries its own pretrained_cfg, that one wins.
TILE_SIZE = 224
INTERPOLATION = "bicubic"
CROP_PCT = 1.0
MICRONS_PER_PIXEL = 0.5

# Token layout of the ViT output: CLS, then registers, then the patch grid.
PATCH_SIZE = 14
NUM_REGISTERS = 4
NUM_PREFIX_TOKENS = 1 + NUM_REGISTERS
EMBED_DIM = 768
NUM_PARAMS = 85_739_520

# SwiGLU hidden ratio of the Bioptimus models (packed hidden 4096 for dim 768).
SWIGLU_MLP_RATIO = 5.33334

# Environment variables h0mini reads itself (the Hub ones belong to huggingface_hub).
ENV_WEIGHTS = "H0MINI_WEIGHTS"

# Written into config.json (key CONFIG_WARNING_KEY) of demo weights, and from there into
# every output's provenance; load_model warns with it.
DEMO_WEIGHTS_LABEL = "random weights: for trying the pipeline, not for science"
CONFIG_WARNING_KEY = "h0mini_warning"
