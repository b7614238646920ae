"""Where the tiles of a slide are, and how each one is read: tiling by µm/px, never by magnification.

A pyramid level within ``tolerance`` (5%) of the target µm/px is read as is; otherwise the
tile's footprint is read from the nearest finer level and downscaled with an area filter
(antialiased). Reading from a coarser level would invent detail, so upsampling is refused
unless asked for.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError, SlideError
from ..tiles import LazyTile
from . import stored_tiles
from .reader import Slide, SlideSource, describe_slide, open_slide
from .tissue import MIN_SATURATION, THUMBNAIL_MPP, MaskLike, TissueMask, detect_tissue, mask_from_user, read_thumbnail

TARGET_MPP = 0.5  # H0-mini's training resolution (20x)
TOLERANCE = 0.05
MIN_TISSUE = 0.25


@dataclass(frozen=True)
class TilingPlan:
    """One slide's grid: what is read where, at what size, for tiles of ``tile_size`` at ``target_mpp``."""

    level0_mpp: float
    target_mpp: float
    tile_size: int
    overlap: int
    read_level: int
    read_mpp: float  # µm/px of the level read
    read_size: int  # side of the region read at read_level
    patch_size_level0: int  # side of a tile's footprint at level 0
    stride_level0: int
    level0_width: int
    level0_height: int
    mpp_source: str  # "metadata" or "argument"

    @property
    def resized(self) -> bool:
        return self.read_size != self.tile_size

    def grid(self) -> np.ndarray:
        """Top-left level-0 corners of every whole tile, row by row."""
        xs = np.arange(0, self.level0_width - self.patch_size_level0 + 1, self.stride_level0, dtype=np.int64)
        ys = np.arange(0, self.level0_height - self.patch_size_level0 + 1, self.stride_level0, dtype=np.int64)
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx.ravel(), gy.ravel()], axis=1).reshape(-1, 2)


def plan_tiling(
    slide: Slide,
    *,
    mpp: Optional[float] = None,
    target_mpp: float = TARGET_MPP,
    tile_size: int = 224,
    overlap: int = 0,
    tolerance: float = TOLERANCE,
    allow_upsampling: bool = False,
) -> TilingPlan:
    """Choose the level and read size for ``tile_size`` px tiles at ``target_mpp`` µm/px."""
    if not (isinstance(tile_size, int) and tile_size > 0):
        raise InvalidArgumentError(f"tile_size must be a positive integer, got {tile_size!r}", argument="tile_size",
                                   accepted="a positive integer")
    if not (isinstance(overlap, int) and 0 <= overlap < tile_size):
        raise InvalidArgumentError(f"overlap must be an integer in [0, tile_size), got {overlap!r}", argument="overlap",
                                   accepted="an integer in [0, tile_size)")
    if not (target_mpp and target_mpp > 0 and math.isfinite(target_mpp)):
        raise InvalidArgumentError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}",
                                   argument="target_mpp", accepted="a positive number of µm/px")
    source = "argument"
    if mpp is None:
        mpp, source = slide.metadata_mpp(), "metadata"
        if mpp is None:
            raise SlideError(
                "no µm/px in the slide's metadata (OpenSlide/tiffslide properties, Aperio MPP, TIFF resolution "
                "tags); pass it if you know it: mpp=0.25 (Python) or --mpp 0.25 (command line). h0mini never "
                "assumes a magnification",
                slide=slide.name,
            )
    elif not (mpp > 0 and math.isfinite(mpp)):
        raise InvalidArgumentError(f"mpp must be a positive number of µm/px, got {mpp!r}", argument="mpp",
                                   accepted="a positive number of µm/px, or None (from the slide)")
    levels = [(lvl, mpp * slide.level_downsample(lvl)) for lvl in range(slide.level_count)]
    close = [lv for lv in levels if abs(lv[1] / target_mpp - 1) <= tolerance]
    finer = [lv for lv in levels if lv[1] < target_mpp]
    if close:
        level, level_mpp = min(close, key=lambda lv: abs(lv[1] / target_mpp - 1))
        read_size = tile_size
    elif finer:
        level, level_mpp = max(finer, key=lambda lv: lv[1])
        read_size = round(tile_size * target_mpp / level_mpp)
    elif allow_upsampling:
        level, level_mpp = min(levels, key=lambda lv: lv[1])
        read_size = max(1, round(tile_size * target_mpp / level_mpp))
    else:
        finest = min(lv[1] for lv in levels)
        raise SlideError(
            f"the finest level has {finest:.3g} µm/px, coarser than the {target_mpp:g} µm/px asked for: tiles would "
            "be upsampled, inventing detail. Ask for a coarser target_mpp, or pass allow_upsampling=True "
            "(--allow-upsampling) if you really mean it",
            slide=slide.name,
        )
    downsample = slide.level_downsample(level)
    size0 = max(1, round(read_size * downsample))
    stride0 = max(1, round((tile_size - overlap) * size0 / tile_size))
    width, height = slide.dimensions
    if width < size0 or height < size0:
        side = tile_size * target_mpp
        told = "the slide's metadata says" if source == "metadata" else "you passed"
        raise SlideError(
            f"at {mpp:g} µm/px ({told} so) the slide is {width * mpp:.4g} x {height * mpp:.4g} µm, smaller than "
            f"one {tile_size} px tile at {target_mpp:g} µm/px ({side:.4g} µm): no tile fits. That µm/px looks "
            "wrong for a whole slide: pass the right one, e.g. mpp=0.25 (Python) or --mpp 0.25 (command line)",
            slide=slide.name,
        )
    return TilingPlan(
        level0_mpp=float(mpp), target_mpp=float(target_mpp), tile_size=tile_size, overlap=overlap,
        read_level=level, read_mpp=float(level_mpp), read_size=int(read_size), patch_size_level0=int(size0),
        stride_level0=int(stride0), level0_width=width, level0_height=height, mpp_source=source,
    )


@dataclass(frozen=True)
class SlideRegion(LazyTile):
    """One tile of a slide, read when it is embedded (in whichever process embeds it)."""

    source: SlideSource
    name: str
    coords: Tuple[int, int]
    level: int
    read_size: int
    tile_size: int

    def encoded_for_device(self, preprocessing: Any):
        """For ``jpeg_decode="device"``: the stored JPEG tiles to decode next to the model, or None."""
        return encoded_for_device(self, preprocessing)

    def load(self) -> Image.Image:
        slide = self.source.open()
        pixels = _read_stored(self, slide)
        if pixels is not None and pixels.shape[0] == self.tile_size:
            return Image.fromarray(pixels)  # as is, or decoded at 1/k (DCT scaling, opt-in)
        if pixels is not None and pixels.shape[0] == 2 * self.tile_size:  # a 40x slide at 0.5 µm/px
            return Image.fromarray(stored_tiles.box_halve(pixels))  # = resize(BOX) below, bit for bit
        image = Image.fromarray(pixels) if pixels is not None else slide.read(
            self.level, self.coords, (self.read_size, self.read_size))
        if self.read_size > self.tile_size:  # area filter: every source pixel counts, no aliasing
            image = image.resize((self.tile_size, self.tile_size), Image.Resampling.BOX)
        elif self.read_size < self.tile_size:  # only with allow_upsampling
            image = image.resize((self.tile_size, self.tile_size), Image.Resampling.BICUBIC)
        return image


def encoded_for_device(region: SlideRegion, preprocessing: Any):
    """The region's stored JPEG tiles for ``jpeg_decode="device"`` (an ``EncodedRegion``), or None to read it
    on the CPU: only where the tiles need nothing after the integer BOX but the model's normalisation."""
    if region.source.obj is not None or not stored_tiles.enabled() or stored_tiles.dct_scaling():
        return None
    if region.read_size % region.tile_size or preprocessing.size is None or preprocessing.needs_resize(
            region.tile_size, region.tile_size):
        return None
    from ..jpeg import EncodedRegion

    slide = region.source.open()
    handle = slide.handle
    try:
        found = stored_tiles.encoded_stored(region.source.path, handle.level_dimensions, handle.level_downsamples,
                                            region.level, region.coords, region.read_size)
    except Exception:  # noqa: BLE001 - never in a worker's way: the CPU path reads it and names what is wrong
        return None
    if found is None:
        return None
    streams, boxes = found
    return EncodedRegion([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams],
                         torch.tensor(boxes, dtype=torch.int64).reshape(-1, 6), region.read_size, region.tile_size, region)


def _read_stored(region: SlideRegion, slide: Slide) -> Optional[np.ndarray]:
    """The region from the slide's stored JPEG tiles (h0mini.wsi.stored_tiles), or None: read it through
    OpenSlide. A damaged stored tile raises its SlideError here, naming the tile."""
    if region.source.obj is not None or not stored_tiles.enabled():
        return None
    handle = slide.handle
    scale = 1
    if stored_tiles.dct_scaling() and region.read_size % region.tile_size == 0:
        factor = region.read_size // region.tile_size
        scale = factor if factor in stored_tiles.DCT_FACTORS else 1
    try:
        pixels = stored_tiles.read_stored(region.source.path, handle.level_dimensions, handle.level_downsamples,
                                          region.level, region.coords, region.read_size, scale)
    except SlideError as error:
        raise SlideError(f"tile at ({region.coords[0]}, {region.coords[1]}): {error.reason}", slide=slide.name) from None
    if pixels is None and scale > 1:
        pixels = stored_tiles.read_stored(region.source.path, handle.level_dimensions, handle.level_downsamples,
                                          region.level, region.coords, region.read_size)
    return pixels


@dataclass(eq=False, repr=False)
class SlideTiles(torch.utils.data.Dataset):
    """The tiles of one slide that would be embedded: a Dataset of lazily read regions.

    Pass it to ``h0mini.embed_tiles`` as any Dataset; DataLoader workers each open the slide
    themselves. ``coords`` are level-0 top-left corners (int64), ``tissue_fractions`` the
    tissue under each kept tile (1.0 without detection).
    """

    source: SlideSource
    plan: TilingPlan
    coords: np.ndarray  # (N, 2) int64
    tissue: Optional[TissueMask]
    tissue_settings: Dict[str, Any]
    tissue_fractions: np.ndarray
    objective_power: Optional[float]
    # the tissue detector's picture of the slide (8 µm/px), reused by QC so a slide is read whole once
    thumbnail: Optional[Image.Image] = field(default=None, repr=False)

    @property
    def stem(self) -> str:
        return slide_stem(self.source.path)

    def __repr__(self) -> str:
        plan = self.plan
        return (f"SlideTiles({self.source.path!r}: {len(self)} tiles of {plan.tile_size} px at {plan.target_mpp:g} µm/px, "
                f"level {plan.read_level} read at {plan.read_size} px, tissue={self.tissue_settings.get('method')})")

    @property
    def in_process_only(self) -> bool:
        return self.source.in_process_only

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> SlideRegion:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        x, y = (int(v) for v in self.coords[index])
        return SlideRegion(
            self.source, f"{self.stem}_x{x}_y{y}", (x, y), self.plan.read_level, self.plan.read_size, self.plan.tile_size
        )

    def regions(self) -> List[SlideRegion]:
        return [self[i] for i in range(len(self))]

    def attributes(self) -> Dict[str, Any]:
        """The ``coords`` attributes TRIDENT and CLAM readers expect, plus h0mini's own."""
        plan = self.plan
        level0_mag = self.objective_power or round(10.0 / plan.level0_mpp, 2)
        return {
            "patch_size": plan.tile_size,
            "patch_size_level0": plan.patch_size_level0,
            "patch_level": plan.read_level,
            "level0_magnification": float(level0_mag),
            "target_magnification": round(10.0 / plan.target_mpp, 2),
            "overlap": plan.overlap,
            "level0_width": plan.level0_width,
            "level0_height": plan.level0_height,
            "level0_mpp": plan.level0_mpp,
            "level0_mpp_source": plan.mpp_source,
            "target_mpp": plan.target_mpp,
            "read_level": plan.read_level,
            "read_mpp": plan.read_mpp,
            "read_size": plan.read_size,
            "name": self.stem,
            "tissue": self.tissue_settings,
        }

    def settings(self) -> Dict[str, Any]:
        """Everything about the tiling that changes which pixels are embedded (a resume key)."""
        return {**asdict(self.plan), "tissue": self.tissue_settings}


def tile_slide(
    slide: Any,
    *,
    mpp: Optional[float] = None,
    target_mpp: float = TARGET_MPP,
    tile_size: int = 224,
    overlap: int = 0,
    tissue: Union[str, MaskLike, None] = "otsu",
    min_tissue: float = MIN_TISSUE,
    reader: str = "auto",
    allow_upsampling: bool = False,
) -> SlideTiles:
    """The tiles of a whole-slide image that H0-mini would embed, without reading them yet.

    Args:
        slide: a path (anything OpenSlide or tiffslide opens) or an object with OpenSlide's API.
        mpp: level-0 µm/px, overriding the slide's metadata (needed when the slide records none).
        target_mpp: µm/px of the tiles; 0.5 (20x) is H0-mini's training resolution.
        tile_size: side of a tile in pixels at ``target_mpp``: the model's input size.
        overlap: pixels (at ``target_mpp``) shared by neighbouring tiles.
        tissue: ``"otsu"`` (detect tissue on a thumbnail), ``None`` (every tile), or a mask (array,
            PIL image or image file) covering the whole slide at any resolution; non-zero is tissue.
        min_tissue: fraction of a tile's footprint that must be tissue for the tile to be kept.
        reader: ``"auto"`` (OpenSlide, then tiffslide), ``"openslide"`` or ``"tiffslide"``.
        allow_upsampling: accept a target finer than the slide's finest level.

    Returns:
        A ``SlideTiles`` Dataset (``coords``, ``plan``, ``attributes()``), for ``h0mini.embed_tiles``.

    Raises:
        SlideError: the file is not a slide, cannot be read, records no µm/px (pass ``mpp``), or the
            target would need upsampling.
    """
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise InvalidArgumentError(f"min_tissue must be in [0, 1], got {min_tissue!r}", argument="min_tissue",
                                   accepted="a number in [0, 1]")
    if isinstance(slide, (str, os.PathLike)):  # this process's cached handle, shared with QC and reads here
        handle = SlideSource(os.fspath(slide), reader).open()
        source = SlideSource(os.fspath(slide), handle.reader)  # workers use the library that opened it here
    else:
        handle = open_slide(slide, reader=reader)
        source = SlideSource(describe_slide(slide), "object", obj=slide)
    plan = plan_tiling(handle, mpp=mpp, target_mpp=target_mpp, tile_size=tile_size, overlap=overlap,
                       allow_upsampling=allow_upsampling)
    coords = plan.grid()
    mask: Optional[TissueMask] = None
    thumbnail = None
    if tissue is None:
        settings: Dict[str, Any] = {"method": "none"}
    elif isinstance(tissue, str) and tissue == "otsu":
        thumbnail, scale = read_thumbnail(handle, plan.level0_mpp)
        mask = detect_tissue(thumbnail, scale, plan.level0_mpp / scale)
        settings = {"method": "otsu-saturation-hysteresis", "thumbnail_mpp": THUMBNAIL_MPP,
                    "threshold": mask.threshold, "floor": MIN_SATURATION, "min_tissue": float(min_tissue)}
    elif isinstance(tissue, str) and not os.path.exists(tissue):
        raise InvalidArgumentError(f"tissue must be 'otsu', None, a mask array/image or a mask file, got {tissue!r}",
                                   argument="tissue", accepted="'otsu', None, a mask array or image, a mask file")
    else:
        mask = mask_from_user(tissue, handle.dimensions, handle.name)
        settings = {"method": "user mask", "min_tissue": float(min_tissue),
                    "mask_sha1": _mask_digest(mask.mask)}
    if mask is not None:
        fractions = mask.tile_fractions(coords, plan.patch_size_level0)
        keep = fractions >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
        coords, fractions = coords[keep], fractions[keep]
    else:
        fractions = np.ones(len(coords))
    return SlideTiles(source, plan, coords, mask, settings, fractions, handle.objective_power(), thumbnail)


def slide_stem(path: str) -> str:
    """A slide's name without folder and extension (``.ome.tif`` counts as one extension); a DICOM
    slide's is its folder's name."""
    if os.path.isdir(path):  # a DICOM slide: the folder's name, whole
        return os.path.basename(os.path.abspath(path))
    if path.lower().endswith(".dcm"):  # an instance of a DICOM slide: its folder's name
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    name = os.path.basename(path.rstrip("/")) or path
    for double in (".ome.tif", ".ome.tiff"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return os.path.splitext(name)[0]


def _mask_digest(mask: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.packbits(mask).tobytes() + str(mask.shape).encode()).hexdigest()
