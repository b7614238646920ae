"""Slide regions read straight from a TIFF/SVS file's stored JPEG tiles: each tile decoded once.

OpenSlide's ``read_region`` decodes every stored tile a region touches, paints it into a
Cairo surface, converts premultiplied ARGB to RGBA, and h0mini then converts that to RGB: three
copies of every pixel, and a 448 px read on a 240 px tile grid decodes up to nine tiles, most of
them again for the next region. Here the tile offsets come from the TIFF (tifffile, read once per
process), the compressed bytes from ``os.pread``, and each stored tile is decoded once by
libjpeg-turbo (simplejpeg) into a small per-process LRU, from which regions are cut.

Pixels equal OpenSlide's exactly: Aperio writes RGB (not YCbCr) JPEG data without saying so in
the JPEG stream, and OpenSlide decodes it by the TIFF's photometric tag; so do we (an Adobe marker
saying "no colour transform" is put in front of such tiles, so any libjpeg reads them as RGB).

Only what is known to match goes this way: tiled, 8-bit, 3-sample, chunky JPEG pages whose size is
an OpenSlide level's, a region inside the level at a whole-pixel position of that level. Anything
else returns None and the caller reads it through OpenSlide.

Memory: at most ``CACHE_BYTES`` (``H0MINI_TILE_CACHE_MB``, default 64 MiB) of decoded tiles and
``MAX_SLIDES`` slides' tile tables per process; a slide's size never changes either.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import SlideError
from .tiff_log import tifffile_notes

CACHE_BYTES = int(float(os.environ.get("H0MINI_TILE_CACHE_MB", "64")) * 2**20)
MAX_SLIDES = 8
DCT_FACTORS = (2, 4, 8)
# APP14 "Adobe", version 100, flags 0, 0, transform 0: three components are RGB, not YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_JPEG = 7
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6


def enabled() -> bool:
    """The fast path is on unless ``H0MINI_STORED_TILES=0``; it needs tifffile and simplejpeg."""
    if os.environ.get("H0MINI_STORED_TILES", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _decoder() is not None


def dct_scaling() -> bool:
    """Decode straight at 1/2, 1/4, 1/8 (libjpeg-turbo's DCT scaling) instead of full size + BOX.

    Opt-in (``H0MINI_JPEG_SCALING=dct``): faster, but pixels differ slightly from the area filter
    (measured in benchmarks/slide_read.py and docs/slide-reading.md)."""
    return os.environ.get("H0MINI_JPEG_SCALING", "").strip().lower() == "dct"


@dataclass(frozen=True)
class StoredLevel:
    """One pyramid level as stored: a grid of JPEG tiles."""

    page: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # int64, one per stored tile, row-major
    counts: np.ndarray
    header: bytes  # SOI (+ Adobe RGB marker) + the shared JPEGTables, without their EOI
    downsample: float  # OpenSlide's, for level-0 -> level coordinates

    @property
    def columns(self) -> int:
        return -(-self.width // self.tile_width)


class StoredSlide:
    """A slide's stored JPEG tiles, or ``None`` from ``open`` when its format is not one we match."""

    def __init__(self, path: str, identity: Tuple[int, int], levels: List[Optional[StoredLevel]]):
        self.path = path
        self.identity = identity
        self.levels = levels
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @classmethod
    def open(cls, path: str, level_dimensions, level_downsamples) -> Optional["StoredSlide"]:
        try:
            import tifffile
        except ImportError:
            return None
        stat = os.stat(path)
        try:
            with tifffile_notes(), tifffile.TiffFile(path) as tif:  # a damaged file is OpenSlide's to report
                pages = [page for page in tif.pages if getattr(page, "is_tiled", False)]
                levels = [_stored_level(pages, dims, ds) for dims, ds in zip(level_dimensions, level_downsamples)]
        except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: OpenSlide reads it
            return None
        if not any(levels):
            return None
        return cls(path, (stat.st_size, stat.st_mtime_ns), levels)

    def read(self, level: int, location: Tuple[int, int], size: int, scale: int = 1) -> Optional[np.ndarray]:
        """The ``size`` x ``size`` px region at ``location`` (level 0) of ``level`` as (H, W, 3) uint8, or None
        where this reader does not match OpenSlide (the caller then reads it through OpenSlide).

        ``scale`` > 1 decodes at 1/scale (DCT scaling): ``size / scale`` px come back."""
        where = self._where(level, location, size)
        if where is None:
            return None
        stored, x, y = where
        tw, th = stored.tile_width, stored.tile_height
        if scale > 1 and (size % scale or x % scale or y % scale or tw % scale or th % scale):
            return None
        out = np.empty((size // scale, size // scale, 3), np.uint8)
        for column, row, (oy, ox, ty, tx, h, w) in _pieces(stored, x, y, size):
            tile = self.tile(level, stored, column, row, scale)
            out[oy // scale : (oy + h) // scale, ox // scale : (ox + w) // scale] = tile[
                ty // scale : (ty + h) // scale, tx // scale : (tx + w) // scale]
        return out

    def encoded(self, level: int, location: Tuple[int, int], size: int) -> Optional[Tuple[List[bytes], List[tuple]]]:
        """The region's stored tiles as complete JPEG streams, undecoded (to decode on the GPU), and where
        each goes: ``(out_y, out_x, tile_y, tile_x, height, width)``; None where ``read`` would be None."""
        where = self._where(level, location, size)
        if where is None:
            return None
        stored, x, y = where
        streams, boxes = [], []
        for column, row, box in _pieces(stored, x, y, size):
            data = self._stored_bytes(level, stored, column, row)
            if data[-2:] != b"\xff\xd9":  # cut short: the device decoder might not say so
                raise SlideError(f"{self._name(level, column, row)} is truncated (no JPEG end marker)", slide=self.path)
            streams.append(stored.header + data[2:])
            boxes.append(box)
        return streams, boxes

    def _where(self, level: int, location: Tuple[int, int], size: int) -> Optional[Tuple[StoredLevel, int, int]]:
        stored = self.levels[level] if level < len(self.levels) else None
        if stored is None:
            return None
        x, y = _level_position(location, stored.downsample)
        if x is None or y is None or x < 0 or y < 0 or x + size > stored.width or y + size > stored.height:
            return None
        return stored, x, y

    def tile(self, level: int, stored: StoredLevel, column: int, row: int, scale: int = 1) -> np.ndarray:
        """One stored tile, decoded (from the cache when it was decoded lately)."""
        key = (self.path, self.identity, level, row * stored.columns + column, scale)
        with _LOCK:
            tile = _TILES.get(key)
            if tile is not None:
                _TILES.move_to_end(key)
                return tile
        tile = self._decode(level, stored, column, row, scale)
        _remember(key, tile)
        return tile

    @staticmethod
    def _name(level: int, column: int, row: int) -> str:
        return f"stored tile (column {column}, row {row}) of level {level}"

    def _stored_bytes(self, level: int, stored: StoredLevel, column: int, row: int) -> bytes:
        """A stored tile's compressed bytes, checked against the tile table and the file's size."""
        index = row * stored.columns + column
        where = self._name(level, column, row)
        if index >= len(stored.offsets):
            raise SlideError(f"{where} is missing from the TIFF's tile table (the file is damaged)", slide=self.path)
        offset, count = int(stored.offsets[index]), int(stored.counts[index])
        if count <= 0:
            raise SlideError(f"{where} has no data (zero-length tile): the file is damaged", slide=self.path)
        if offset + count > self.identity[0]:
            raise SlideError(
                f"{where} lies past the end of the file (bytes {offset}..{offset + count} of {self.identity[0]}): "
                "the file is truncated or damaged", slide=self.path)
        data = os.pread(self._fd, count, offset)
        if len(data) != count or data[:2] != b"\xff\xd8":
            raise SlideError(f"{where} is not JPEG data (the file is damaged)", slide=self.path)
        return data

    def _decode(self, level: int, stored: StoredLevel, column: int, row: int, scale: int) -> np.ndarray:
        data = self._stored_bytes(level, stored, column, row)
        where = self._name(level, column, row)
        decode = _decoder()
        height, width = stored.tile_height // scale, stored.tile_width // scale
        options: Dict[str, Any] = {}
        if scale > 1:
            options = {"min_height": height, "min_width": width}
        try:  # strict: libjpeg's "corrupt data" warnings are errors, never grey or black pixels
            tile = decode(stored.header + data[2:], colorspace="RGB", strict=True, **options)
        except Exception as error:  # noqa: BLE001 - simplejpeg raises ValueError; name the tile whatever it is
            raise SlideError(f"{where} cannot be decoded: {error}", slide=self.path) from None
        if tile.shape != (height, width, 3):
            raise SlideError(
                f"{where} decodes to {tile.shape[1]}x{tile.shape[0]} px, not the TIFF's {width}x{height}",
                slide=self.path)
        return tile


def _pieces(stored: StoredLevel, x: int, y: int, size: int):
    """(column, row, (out_y, out_x, tile_y, tile_x, height, width)) of each stored tile under a region."""
    tw, th = stored.tile_width, stored.tile_height
    for row in range(y // th, (y + size - 1) // th + 1):
        for column in range(x // tw, (x + size - 1) // tw + 1):
            left, top = max(x, column * tw), max(y, row * th)
            right, bottom = min(x + size, (column + 1) * tw), min(y + size, (row + 1) * th)
            yield column, row, (top - y, left - x, top - row * th, left - column * tw, bottom - top, right - left)


def encoded_stored(path: str, level_dimensions, level_downsamples, level: int, location: Tuple[int, int],
                   size: int) -> Optional[Tuple[List[bytes], List[tuple]]]:
    """This process's undecoded read of a region (``StoredSlide.encoded``), or None."""
    slide = _slide(path, level_dimensions, level_downsamples)
    return None if slide is None else slide.encoded(level, location, size)


def read_stored(path: str, level_dimensions, level_downsamples, level: int, location: Tuple[int, int], size: int,
                scale: int = 1) -> Optional[np.ndarray]:
    """This process's fast read of a region, or None (read it through OpenSlide instead)."""
    slide = _slide(path, level_dimensions, level_downsamples)
    return None if slide is None else slide.read(level, location, size, scale)


def box_halve(pixels: np.ndarray) -> np.ndarray:
    """(2h, 2w, 3) uint8 shrunk to (h, w, 3), equal to Pillow's ``resize((w, h), BOX)`` bit for bit.

    Pillow's BOX at factor 2 weighs each pixel pair 2^21 / 2^22 and rounds half up after its horizontal
    pass, then again after its vertical one: ``(a + b + 1) >> 1`` twice, which is ``(a | b) - ((a ^ b) >> 1)``
    in uint8 without widening. The horizontal mean is taken for every adjacent pair over each row's
    contiguous bytes (SIMD-friendly), the vertical one next, and only then the pairs Pillow takes
    ((0, 1), (2, 3), ...) are picked: 0.27 ms for a 448 px region here against 0.75 ms through
    ``Image.fromarray`` + ``resize`` (half of a stored-tile read's CPU time)."""
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    pairs = _ceil_mean(rows[:, :-channels], rows[:, channels:])  # pixel j with j + 1, for every j
    pairs = _ceil_mean(pairs[0::2], pairs[1::2]).reshape(height // 2, width - 1, channels)
    return np.take(pairs, np.arange(0, width - 1, 2), axis=1)


def _ceil_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a + b + 1) >> 1`` of uint8 arrays, in uint8."""
    out = a | b
    half = a ^ b
    half >>= 1
    out -= half
    return out


def release(path: str) -> None:
    """Forget this process's tile tables and decoded tiles of ``path`` (a finished slide)."""
    with _LOCK:
        for key in [k for k in _SLIDES if k[0] == path]:
            slide = _SLIDES.pop(key)
            if slide is not None:
                slide.close()
        for key in [k for k in _TILES if k[0] == path]:
            _forget(key)


def cache_info() -> Dict[str, int]:
    """What this process holds: decoded tiles, their bytes, the bound, open slides."""
    with _LOCK:
        return {"tiles": len(_TILES), "bytes": _CACHED[0], "bound": CACHE_BYTES, "slides": len(_SLIDES)}


# -- per-process state ------------------------------------------------------------------------------

_LOCK = threading.Lock()
_TILES: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_CACHED = [0]
_SLIDES: "OrderedDict[tuple, Optional[StoredSlide]]" = OrderedDict()


def _slide(path: str, level_dimensions, level_downsamples) -> Optional[StoredSlide]:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # OpenSlide reports it
    key = (path, stat.st_size, stat.st_mtime_ns, os.getpid())
    with _LOCK:
        if key in _SLIDES:
            _SLIDES.move_to_end(key)
            return _SLIDES[key]
    slide = StoredSlide.open(path, level_dimensions, level_downsamples)  # None is remembered too
    with _LOCK:
        _SLIDES[key] = slide
        while len(_SLIDES) > MAX_SLIDES:
            _, old = _SLIDES.popitem(last=False)
            if old is not None:
                old.close()
    return slide


def _remember(key: tuple, tile: np.ndarray) -> None:
    with _LOCK:
        if key in _TILES or tile.nbytes > CACHE_BYTES:
            return
        _TILES[key] = tile
        _CACHED[0] += tile.nbytes
        while _CACHED[0] > CACHE_BYTES:
            _forget(next(iter(_TILES)))


def _forget(key: tuple) -> None:
    _CACHED[0] -= _TILES.pop(key).nbytes


def _stored_level(pages, dims, downsample) -> Optional[StoredLevel]:
    """The tiled page with this OpenSlide level's size, if its tiles are JPEG we decode like OpenSlide."""
    width, height = (int(v) for v in dims)
    for index, page in enumerate(pages):
        if (page.imagewidth, page.imagelength) != (width, height):
            continue
        photometric = int(page.photometric)
        fits = (int(page.compression) == _JPEG and page.samplesperpixel == 3 and page.bitspersample == 8
                and int(page.planarconfig) == 1 and getattr(page, "imagedepth", 1) == 1
                and photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR))
        if not fits:
            return None
        tables = page.jpegtables or b""
        if tables and not (tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"):
            return None
        header = b"\xff\xd8" + (_ADOBE_RGB if photometric == _PHOTOMETRIC_RGB else b"") + tables[2:-2]
        return StoredLevel(
            page=index, width=width, height=height, tile_width=int(page.tilewidth), tile_height=int(page.tilelength),
            offsets=np.asarray(page.dataoffsets, np.int64), counts=np.asarray(page.databytecounts, np.int64),
            header=header, downsample=float(downsample),
        )
    return None


def _level_position(location: Tuple[int, int], downsample: float) -> Tuple[Optional[int], Optional[int]]:
    """Level pixel of a level-0 corner, when it falls on a whole pixel (else OpenSlide would interpolate)."""
    position = []
    for value in location:
        exact = value / downsample
        nearest = round(exact)
        position.append(int(nearest) if abs(exact - nearest) < 1e-6 else None)
    return position[0], position[1]


def _decoder():
    try:
        from simplejpeg import decode_jpeg
    except ImportError:
        return None
    return decode_jpeg
