"""Checkpoints and tiles the tests build for themselves (H0-mini's weights cannot be shipped)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

import h0mini  # noqa: F401  (registers the architectures)
from h0mini.checkpoint_io import write_hub_checkpoint
from h0mini.testing import random_model, trained_like  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_TILES = sorted((ROOT / "examples" / "tiles").glob("*.png"))
SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"


def make_model(arch: str = "h0mini_test", seed: int = 0) -> torch.nn.Module:
    return random_model(arch, seed)


def write_checkpoint(folder: Path, arch: str = "h0mini_test", seed: int = 0, dtype=None) -> torch.nn.Module:
    """Write config.json + model.safetensors (the Hub layout) and return the model they hold."""
    model = make_model(arch, seed)
    write_hub_checkpoint(folder, model, arch, dtype=dtype)
    return model


def checkpoint_files(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def slide_tiles(min_tissue: float = 0.5) -> List[Tuple[Tuple[int, int], np.ndarray]]:
    """All 224 px tissue tiles of the example slide: ((x, y), uint8 array), about 43 of them."""
    image = Image.open(SLIDE)
    image.seek(0)
    pixels = np.asarray(image.convert("RGB"))
    tiles = []
    for y in range(0, pixels.shape[0] - 223, 224):
        for x in range(0, pixels.shape[1] - 223, 224):
            tile = pixels[y : y + 224, x : x + 224]
            saturation = tile.max(-1).astype(int) - tile.min(-1)
            if ((saturation > 20) & (tile.mean(-1) < 220)).mean() >= min_tissue:
                tiles.append(((x, y), tile))
    return tiles
