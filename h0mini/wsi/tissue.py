"""Tissue detection that needs no model and no extra package.

A thumbnail at a few µm/px (8 by default) is read in strips from the coarsest level
that is fine enough, so a slide's pixels are never held whole. Tissue is stained, glass
is not: Otsu's threshold on the HSV saturation (median-filtered, and never below a
floor, so a blank slide stays blank), extended by hysteresis to pale tissue, then small
holes filled and specks removed (scipy.ndimage). A tile is kept when the fraction of
tissue under its footprint reaches ``min_tissue``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageFilter

from ..errors import SlideError
from .reader import _FORK_GUARD, Slide

THUMBNAIL_MPP = 8.0  # µm/px of the picture tissue is detected on
MIN_SATURATION = 15  # below this, whatever Otsu says, a pixel is glass
MIN_OBJECT_UM2 = 2_500.0  # fragments smaller than 50 x 50 µm are specks
MAX_HOLE_UM2 = 10_000.0  # holes smaller than 100 x 100 µm (lumens, tears) are filled
_STRIP_PIXELS = 16_000_000  # pixels read at once while building the thumbnail

MaskLike = Union[np.ndarray, Image.Image, str, os.PathLike]


@dataclass
class TissueMask:
    """A boolean mask over the whole slide, ``scale`` mask pixels per level-0 pixel."""

    mask: np.ndarray  # (H, W) bool
    scale: float
    threshold: Optional[int] = None  # the saturation threshold, when detected

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tile_fractions(self, coords: np.ndarray, size_level0: int) -> np.ndarray:
        """Fraction of tissue under each tile (level-0 top-left ``coords``, side ``size_level0``)."""
        if len(coords) == 0:
            return np.zeros(0)
        integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = self.mask.shape
        x0 = np.clip(np.round(coords[:, 0] * self.scale).astype(np.int64), 0, w)
        y0 = np.clip(np.round(coords[:, 1] * self.scale).astype(np.int64), 0, h)
        x1 = np.clip(np.maximum(np.round((coords[:, 0] + size_level0) * self.scale).astype(np.int64), x0 + 1), 0, w)
        y1 = np.clip(np.maximum(np.round((coords[:, 1] + size_level0) * self.scale).astype(np.int64), y0 + 1), 0, h)
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return inside / area


def read_thumbnail(slide: Slide, level0_mpp: float, mpp: float = THUMBNAIL_MPP) -> Tuple[Image.Image, float]:
    """The whole slide at about ``mpp`` µm/px (never finer than level 0), and its scale per level-0 pixel."""
    width, height = slide.dimensions
    factor = max(mpp / level0_mpp, 1.0)  # level-0 pixels per thumbnail pixel
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    level = max(
        (lvl for lvl in range(slide.level_count) if slide.level_downsample(lvl) <= factor * 1.01),
        key=slide.level_downsample,
        default=0,
    )
    level_width, level_height = slide.level_dimensions(level)
    downsample = slide.level_downsample(level)
    thumbnail = Image.new("RGB", size, (255, 255, 255))
    rows = max(1, _STRIP_PIXELS // max(level_width, 1))
    y = 0
    while y < level_height:
        strip_rows = min(rows, level_height - y)
        strip = slide.read(level, (0, round(y * downsample)), (level_width, strip_rows))
        top = round(y * size[1] / level_height)
        bottom = max(top + 1, round((y + strip_rows) * size[1] / level_height))
        thumbnail.paste(strip.resize((size[0], bottom - top), Image.Resampling.BOX), (0, top))
        y += strip_rows
    return thumbnail, size[0] / width


def detect_tissue(thumbnail: Image.Image, scale: float, mpp: float = THUMBNAIL_MPP) -> TissueMask:
    """Tissue on ``thumbnail`` (``mpp`` µm/px): hysteresis between Otsu's threshold and a floor.

    Otsu on the saturation separates glass from *stained* tissue, but in H&E pale stroma and
    fat fall below it. So Otsu's level marks confident tissue, and any region above the
    glass floor that touches confident tissue is tissue too (hysteresis, as in Canny's edge
    detector); faint regions alone (dust, glass tint) are not. Then holes under
    ``MAX_HOLE_UM2`` are filled and fragments under ``MIN_OBJECT_UM2`` dropped.
    """
    with _FORK_GUARD:  # a worker forked during this first import would inherit its lock, held
        from scipy import ndimage

    saturation = np.asarray(thumbnail.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(5)))
    threshold = max(otsu_threshold(saturation), MIN_SATURATION)
    weak = saturation > MIN_SATURATION
    labels, count = ndimage.label(weak)
    if count == 0:
        return TissueMask(np.zeros_like(weak), scale, threshold)
    pixel_area = mpp * mpp
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    confident = np.bincount(labels.ravel(), weights=(saturation > threshold).ravel(), minlength=count + 1) > 0
    keep = confident & (sizes * pixel_area >= MIN_OBJECT_UM2)
    keep[0] = False
    mask = keep[labels]
    holes = ndimage.binary_fill_holes(mask) & ~mask
    hole_labels, hole_count = ndimage.label(holes)
    if hole_count:
        hole_sizes = np.bincount(hole_labels.ravel(), minlength=hole_count + 1)
        small = hole_sizes * pixel_area < MAX_HOLE_UM2
        small[0] = False
        mask |= small[hole_labels]
    return TissueMask(mask, scale, threshold)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the level that maximises the between-class variance."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 0
    levels = np.arange(256)
    weight_low = np.cumsum(histogram)
    weight_high = total - weight_low
    sum_low = np.cumsum(histogram * levels)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))


def mask_from_user(mask: MaskLike, slide_size: Tuple[int, int], name: str) -> TissueMask:
    """A user's mask (array, image or image file) aligned with the whole slide, at any resolution."""
    if isinstance(mask, (str, os.PathLike)):
        try:
            with Image.open(mask) as image:
                mask = image.convert("L")
        except (OSError, ValueError) as error:
            raise SlideError(f"cannot read the tissue mask {os.fspath(mask)!r}: {error}", slide=name) from None
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(-1)
    if array.ndim != 2 or array.size == 0:
        raise SlideError(f"a tissue mask must be a 2-D array or image, got shape {array.shape}", slide=name)
    width, height = slide_size
    scale_x, scale_y = array.shape[1] / width, array.shape[0] / height
    if abs(scale_x - scale_y) > 0.02 * max(scale_x, scale_y) + 1.0 / min(width, height):
        raise SlideError(
            f"the tissue mask ({array.shape[1]}x{array.shape[0]}) does not have the slide's aspect ratio "
            f"({width}x{height}): it must cover the whole slide",
            slide=name,
        )
    return TissueMask(array > 0, scale_x)
