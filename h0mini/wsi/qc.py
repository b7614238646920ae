"""A quality-control picture per slide: thumbnail, tissue outline and the tiles that were kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .grid import SlideTiles
from .tissue import read_thumbnail

TISSUE_COLOUR = (0, 200, 70)
TILE_COLOUR = (20, 60, 255)
LONG_SIDE = 1200  # px of the picture's longer side, at most


def qc_image(tiles: SlideTiles, thumbnail: Optional[Image.Image] = None) -> Image.Image:
    """Draw the slide's thumbnail with the tissue outline (green) and the kept tiles (blue)."""
    width0, height0 = tiles.plan.level0_width, tiles.plan.level0_height
    if thumbnail is None and tiles.thumbnail is not None and max(tiles.thumbnail.size) >= LONG_SIDE // 2:
        thumbnail = tiles.thumbnail  # tissue detection read it: a slide without a pyramid is not read whole again
    if thumbnail is None:  # as fine as LONG_SIDE allows, read in strips like the tissue thumbnail
        mpp = max(tiles.plan.level0_mpp, max(width0, height0) * tiles.plan.level0_mpp / LONG_SIDE)
        thumbnail, _ = read_thumbnail(tiles.source.open(), tiles.plan.level0_mpp, mpp)
    zoom = min(LONG_SIDE / max(thumbnail.size), 4.0)
    size = (max(1, round(thumbnail.width * zoom)), max(1, round(thumbnail.height * zoom)))
    picture = thumbnail.convert("RGB").resize(size, Image.Resampling.BICUBIC if zoom > 1 else Image.Resampling.BOX)
    if tiles.tissue is not None:
        mask = Image.fromarray(tiles.tissue.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) != np.asarray(mask.filter(ImageFilter.MinFilter(3)))
        pixels = np.array(picture)
        pixels[edge] = TISSUE_COLOUR
        picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    sx, sy = size[0] / width0, size[1] / height0
    side = tiles.plan.patch_size_level0
    for x, y in tiles.coords.tolist():
        draw.rectangle([x * sx, y * sy, (x + side) * sx - 1, (y + side) * sy - 1], outline=TILE_COLOUR, width=1)
    return picture


def save_qc_image(tiles: SlideTiles, path: Union[str, os.PathLike]) -> Path:
    """Write the QC picture as PNG (atomically: a picture under its name is always whole), removing the
    temporary files that killed writers of the same picture left beside it."""
    from ..atomic import atomic_path, remove_stale_temp

    path = Path(path)
    remove_stale_temp(path)
    with atomic_path(path) as tmp:
        qc_image(tiles).save(tmp, format="PNG")
    return path

