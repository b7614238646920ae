"""Turn whatever a user passes as tiles into a stream of items, and items into RGB pixels.

The decoding rules live here so that every entry point (Python, CLI, workers)
reads an image the same way:

* Paths: a file is one tile; a folder means its image files (not recursive) in
  sorted order; a glob pattern its sorted matches; a ``.txt``/``.csv``/``.tsv``
  list file one path per line (CSV: the ``path`` column, else the first; relative
  paths are taken from the list file's folder; ``x``/``y`` columns become coords).
* Whole slides are not tiles: a file with a slide-only suffix (``.svs``, ``.ndpi``,
  ``.mrxs``...) passed by name is refused, and skipped with one warning naming it in a
  folder or glob. ``.tif``/``.tiff`` are tile formats too, so such a file is refused only
  when it opens as a pyramid (more than one page, the second smaller than the first).
  Either way the message points to ``h0mini embed-slides``.
* Modes: RGB is kept; alpha (RGBA, LA, PA, P with transparency) is composited on
  white, because white is glass in a slide; grayscale and CMYK go through Pillow's
  RGB conversion; 16-bit grayscale is scaled to 8 bits (divided by 257) before it.
"""

from __future__ import annotations

import csv
import glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InvalidTileError
from .wording import say

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm"})
LIST_SUFFIXES = frozenset({".txt", ".csv", ".tsv", ".lst"})
GLOB_CHARS = ("*", "?", "[")
# Longer side over shorter side. Beyond this an image is a strip or a lying header, not a tile: a
# 241-byte 1x40000 PNG would otherwise be resized to 224x8960000 pixels (9 GB) before the crop.
MAX_ASPECT_RATIO = 64
# Files OpenSlide or tiffslide open as whole slides (h0mini.wsi reads them; the tile commands refuse them).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm", ".qptiff"}
)
# Of those, the ones that are never a tile (.tif/.tiff are, unless pyramidal).
SLIDE_ONLY_SUFFIXES = SLIDE_SUFFIXES - IMAGE_SUFFIXES


def slide_hint() -> str:
    return say(
        "embed whole slides with h0mini.embed_slides() (tiled by µm/px, tissue only)",
        "embed whole slides with `h0mini embed-slides SLIDE... -o DIR` (tiled by µm/px, tissue only)",
    )


def is_slide_only(path: Union[str, os.PathLike]) -> bool:
    """True for a suffix that names a whole-slide format and never a tile (``.svs``, ``.ndpi``...)."""
    return Path(path).suffix.lower() in SLIDE_ONLY_SUFFIXES


@dataclass(frozen=True)
class TileRef:
    """A tile on disk: its path and, when a list file gave them, its slide coordinates."""

    path: str
    coords: Optional[Tuple[int, int]] = None


class LazyTile:
    """A tile read only when it is embedded, possibly in a worker process (a region of a slide).

    Subclasses are small and picklable: ``name`` identifies the tile (in errors, outputs and
    resumes), ``coords`` are its slide coordinates, ``load()`` returns its RGB pixels.
    """

    name: str
    coords: Optional[Tuple[int, int]]

    def load(self) -> Union[np.ndarray, Image.Image]:
        raise NotImplementedError


@dataclass
class TileInput:
    """What ``read_input`` makes of the user's argument."""

    items: Iterable[Any]  # TileRef or in-memory image (PIL, ndarray, tensor)
    single: bool  # one tile in: one vector out
    length: Optional[int]  # None for generators
    all_paths: bool  # every item is a TileRef or a LazyTile (decodable in worker processes)
    in_process_only: bool = False  # items hold something that must stay in this process (an open slide)


def is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def read_input(tiles: Any) -> TileInput:
    """Classify ``tiles`` and expand paths (folders, globs, list files)."""
    if isinstance(tiles, (Image.Image,)):
        return TileInput([tiles], single=True, length=1, all_paths=False)
    if isinstance(tiles, np.ndarray):
        if tiles.ndim in (2, 3):  # (H, W) grayscale or (H, W, C)
            return TileInput([tiles], single=True, length=1, all_paths=False)
        if tiles.ndim == 4:
            return TileInput(list(tiles), single=False, length=len(tiles), all_paths=False)
        raise InvalidTileError(f"a numpy array of tiles must be (H, W, 3), (H, W) or (N, H, W, 3), got shape {tiles.shape}")
    if isinstance(tiles, torch.Tensor):
        if tiles.ndim == 3:
            return TileInput([tiles], single=True, length=1, all_paths=False)
        if tiles.ndim == 4:
            return TileInput(list(tiles.unbind(0)), single=False, length=len(tiles), all_paths=False)
        raise InvalidTileError(f"a tensor of tiles must be (3, H, W) or (N, 3, H, W), got shape {tuple(tiles.shape)}")
    if isinstance(tiles, TileRef):
        return TileInput([tiles], single=True, length=1, all_paths=True)
    if is_path(tiles):
        refs = expand_path(tiles)
        single = Path(tiles).is_file() and Path(tiles).suffix.lower() not in LIST_SUFFIXES
        return TileInput(refs, single=single, length=len(refs), all_paths=True)
    if isinstance(tiles, torch.utils.data.Dataset) and hasattr(tiles, "__len__"):
        return TileInput(DatasetItems(tiles), single=False, length=len(tiles), all_paths=False,
                         in_process_only=bool(getattr(tiles, "in_process_only", False)))
    if isinstance(tiles, (str, bytes)):
        raise InvalidTileError(f"cannot read tiles from {type(tiles).__name__}")
    if isinstance(tiles, Sequence) and all(is_path(t) or isinstance(t, TileRef) for t in tiles):
        refs = [t if isinstance(t, TileRef) else TileRef(str(t)) for t in tiles]
        return TileInput(refs, single=False, length=len(refs), all_paths=True)
    if isinstance(tiles, Iterable):
        length = len(tiles) if hasattr(tiles, "__len__") else None
        return TileInput(tiles, single=False, length=length, all_paths=False)
    raise InvalidTileError(
        f"cannot embed an object of type {type(tiles).__name__}: pass a PIL image, a uint8 array (H, W, 3) or "
        "(N, H, W, 3), a tensor (3, H, W) or (N, 3, H, W), a path, a folder, a glob, a list file, a torch "
        "Dataset or an iterable of these"
    )


class DatasetItems:
    """A torch Dataset seen as tiles: ``(image, label)`` items give their image."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        return item

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


def expand_path(spec: Union[str, os.PathLike]) -> List[TileRef]:
    """Paths of the tiles a path argument names (file, folder, glob or list file)."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if _is_tile_file(str(p)))
        _warn_skipped_slides(text, [str(p) for p in entries if is_slide_only(p)])
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise InvalidTileError(f"the folder {text!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                                   + (f"; {slide_hint()}" if any(is_slide_only(p) for p in entries) else ""))
        return [TileRef(str(p)) for p in files]
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return read_list_file(path)
        if is_slide_only(path):
            raise InvalidTileError(f"a whole-slide file ({path.suffix}), not a tile: {slide_hint()}", source=text)
        return [TileRef(str(path))]
    if any(c in text for c in GLOB_CHARS):
        matches = sorted(set(glob_once(os.path.expanduser(text))))
        files = [m for m in matches if _is_tile_file(m)]
        _warn_skipped_slides(text, [m for m in files if is_slide_only(m)])
        files = [m for m in files if not is_slide_only(m)]
        if not files:
            raise InvalidTileError(f"the pattern {text!r} matches no tile files")
        return [TileRef(m) for m in files]
    raise InvalidTileError(f"no such file, folder or pattern: {text!r}")


def _warn_skipped_slides(spec: str, slides: List[str]) -> None:
    if slides:
        shown = ", ".join(repr(os.path.basename(s)) for s in slides[:5]) + (f" and {len(slides) - 5} more" if len(slides) > 5 else "")
        warnings.warn(f"{spec!r}: skipped {len(slides)} whole-slide file(s), not tiles: {shown}; {slide_hint()}",
                      UserWarning, stacklevel=3)


def _is_tile_file(path: str) -> bool:
    """A file, or a broken symbolic link: listed so that it is reported as a bad tile, not dropped."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def glob_once(pattern: str) -> List[str]:
    """``glob.glob(pattern, recursive=True)``, following symbolic links but entering each folder once.

    ``glob`` follows a link back up the tree (``dir/loop -> dir``) 40 times over, and two such
    links 2**40 times; here ``**`` walks each real folder once, by its first (sorted) path.
    """
    head, marker, tail = pattern.partition("**")
    if not marker:
        return glob.glob(pattern)
    matches: List[str] = []
    for root in (glob.glob(head) if glob.has_magic(head) else [head]) if head else [os.curdir]:
        seen = set()
        for folder, subfolders, names in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # as glob's ** does
            if real in seen:
                subfolders[:] = []
                continue
            seen.add(real)
            prefix = folder if head else os.path.relpath(folder)
            if tail:
                matches.extend(glob_once(os.path.join(prefix, tail.lstrip("/" + os.sep))))
            else:
                matches.extend(os.path.join(prefix, n) for n in names if not n.startswith("."))
    return matches


def read_list_file(path: Path) -> List[TileRef]:
    base = path.parent
    refs: List[TileRef] = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if not reader.fieldnames:
                raise InvalidTileError(f"the list file {str(path)!r} is empty")
            column = "path" if "path" in reader.fieldnames else reader.fieldnames[0]
            has_xy = "x" in reader.fieldnames and "y" in reader.fieldnames
            for line, row in enumerate(reader, start=2):
                value = (row.get(column) or "").strip()
                if not value:
                    continue
                coords = None
                if has_xy:
                    try:
                        coords = (int(float(row["x"])), int(float(row["y"]))) 
                    except (TypeError, ValueError):
                        raise InvalidTileError(
                            f"line {line} of {str(path)!r}: x/y must be numbers, got {row['x']!r}, {row['y']!r}"
                        ) from None
                refs.append(TileRef(str(base / value), coords))
        else:
            for raw in f:
                value = raw.strip()
                if value and not value.startswith("#"):
                    refs.append(TileRef(str(base / value)))
    if not refs:
        raise InvalidTileError(f"the list file {str(path)!r} lists no tiles")
    return refs


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image file as RGB, with errors (and warnings) that name the file.

    The size in the header is checked before the pixels are decoded, so a small file that
    claims a huge or absurdly elongated image costs nothing.
    """
    if not os.path.exists(path):
        if os.path.islink(path):
            raise InvalidTileError(f"broken symbolic link (to {os.readlink(path)!r})", source=path)
        raise InvalidTileError("file not found", source=path)
    if os.path.getsize(path) == 0:
        raise InvalidTileError("file is empty", source=path)
    if is_slide_only(path):
        raise InvalidTileError(f"a whole-slide file, not a tile: {slide_hint()}", source=path)
    size = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
                if is_pyramid(image):
                    raise InvalidTileError(
                        f"a pyramidal TIFF ({image.width}x{image.height}, {image.n_frames} pages): a whole slide, "
                        f"not a tile; {slide_hint()}"
                    )
                check_aspect(*size)
                image.load()
                rgb = to_rgb(image)
    except InvalidTileError as error:
        raise InvalidTileError(error.reason, source=path) from None
    except UnidentifiedImageError:
        raise InvalidTileError("not an image Pillow can read", source=path) from None
    except Image.DecompressionBombError as error:
        raise InvalidTileError(
            f"its header claims too many pixels, more than twice Pillow's decompression-bomb limit ({error}); "
            "if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS",
            source=path,
        ) from None
    except (OverflowError, MemoryError):
        raise InvalidTileError(f"its header claims {_pixels(size)}, too many to decode", source=path) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidTileError(f"corrupt or truncated image ({error})", source=path) from None
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            warnings.warn(f"{path!r}: {_pixels(size)}, more than Pillow's decompression-bomb warning limit; "
                          "decoded anyway", Image.DecompressionBombWarning, stacklevel=2)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return rgb


def _pixels(size: Optional[Tuple[int, int]]) -> str:
    return f"{size[0]}x{size[1]} pixels" if size else "more pixels than fit in memory"


def check_aspect(width: int, height: int) -> None:
    """Reject an image whose sides are not a tile's (empty, or longer than ``MAX_ASPECT_RATIO`` : 1)."""
    if width < 1 or height < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidTileError(
            f"a {width}x{height} image is not a tile: its sides differ by more than {MAX_ASPECT_RATIO}:1 "
            "(cut long strips into tiles first)"
        )


def centre_crop_resized(image: Image.Image, short_side: int, crop: int, resample: int) -> Image.Image:
    """``image`` with its shorter side resized to ``short_side``, then centre-cropped to ``crop`` x ``crop``.

    Only the kept crop is resampled (Pillow's ``box``), so an elongated image never becomes a
    huge intermediate. The geometry is torchvision's (``Resize`` then ``CenterCrop``); the
    pixels can differ from it by a grey level where a filter weight rounds the other way.
    """
    width, height = image.size
    if width <= height:
        new_width, new_height = short_side, int(short_side * height / width)
    else:
        new_width, new_height = int(short_side * width / height), short_side
    top, left = int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    return image.resize((crop, crop), resample, box=box)


def is_pyramid(image: Image.Image) -> bool:
    """A multi-page TIFF whose second page is smaller than the first: a slide's resolution pyramid."""
    if image.format != "TIFF" or getattr(image, "n_frames", 1) < 2:
        return False
    size = image.size
    try:
        image.seek(1)
        smaller = image.size[0] < size[0] and image.size[1] < size[1]
    finally:
        image.seek(0)
    return smaller


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the mode rules of this module's docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # One scale for every image of these modes, never read off its content: 0-65535 to 0-255
        # (Pillow opens 16-bit PNGs and TIFFs as "I" or "I;16"; a dark 16-bit tile stays dark).
        scaled = np.round(np.asarray(image).astype(np.float64) / 257.0)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "F":
        raise InvalidTileError("32-bit float images (mode 'F') have no defined colour scale; convert them to 8-bit first")
    return image.convert("RGB")


def describe(item: Any) -> str:
    if isinstance(item, LazyTile):
        return item.name
    if isinstance(item, Image.Image):
        return f"PIL image {item.mode} {item.size[0]}x{item.size[1]}"
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return f"{type(item).__name__} {tuple(item.shape)} {item.dtype}"
    return type(item).__name__
