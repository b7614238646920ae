"""Open whole-slide images with OpenSlide, tiffslide or any object with OpenSlide's API.

A ``SlideSource`` is what travels to DataLoader workers: the slide's path and the
reader's name, never an open handle (handles do not survive pickling, and a handle
shared across a fork is unsafe). Each process opens the slide once, on first use.
µm/px comes from the slide's own metadata or from the caller; it is never guessed
from a magnification.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import OptionalDependencyError, SlideError
from ..tiles import SLIDE_SUFFIXES, to_rgb

READERS = ("auto", "openslide", "tiffslide")
_INCH_CM = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "millimeter": 1000.0}
_API = ("level_count", "level_dimensions", "level_downsamples", "properties", "read_region")


@dataclass(frozen=True)
class SlideSource:
    """How to (re)open one slide in any process: a path and a reader, or a user's reader object."""

    path: str
    reader: str = "auto"
    obj: Any = field(default=None, compare=False, repr=False)  # a user's OpenSlide-like object

    @property
    def in_process_only(self) -> bool:
        """A user's object stays in this process: tiles are read in a thread, not in workers."""
        return self.obj is not None

    def __getstate__(self) -> Dict[str, Any]:
        if self.obj is not None:
            raise SlideError("a reader object cannot be sent to worker processes; use num_workers=0", slide=self.path)
        return {"path": self.path, "reader": self.reader, "obj": None}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def open(self) -> "Slide":
        """This process's handle (opened once per process and reader)."""
        if self.obj is not None:
            return Slide(self.obj, self.path, "object")
        key = (self.path, self.reader, os.getpid())
        with _HANDLES_LOCK:
            slide = _HANDLES.get(key)
            if slide is None:
                slide = _HANDLES[key] = open_slide(self.path, reader=self.reader)
        return slide


_HANDLES: Dict[Tuple[str, str, int], "Slide"] = {}
_HANDLES_LOCK = threading.Lock()


class Slide:
    """A thin view over an OpenSlide-like handle: levels, µm/px, and RGB regions."""

    def __init__(self, handle: Any, name: str, reader: str):
        missing = [a for a in _API if not hasattr(handle, a)]
        if missing:
            raise SlideError(
                f"a {type(handle).__name__} is not a slide reader: it lacks {', '.join(missing)} "
                "(pass a path, an openslide.OpenSlide or a tiffslide.TiffSlide)",
                slide=name,
            )
        self.handle = handle
        self.name = name
        self.reader = reader

    @property
    def dimensions(self) -> Tuple[int, int]:
        return tuple(int(v) for v in self.handle.level_dimensions[0])  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return int(self.handle.level_count)

    def level_dimensions(self, level: int) -> Tuple[int, int]:
        return tuple(int(v) for v in self.handle.level_dimensions[level])  # type: ignore[return-value]

    def level_downsample(self, level: int) -> float:
        return float(self.handle.level_downsamples[level])

    @property
    def properties(self) -> Dict[str, Any]:
        return dict(self.handle.properties)

    def metadata_mpp(self) -> Optional[float]:
        """µm/px at level 0 from the slide's metadata, or None when it records none."""
        return mpp_from_properties(self.properties)

    def objective_power(self) -> Optional[float]:
        props = self.properties
        for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
            value = _positive_float(props.get(key))
            if value is not None:
                return value
        return None

    def read(self, level: int, location: Tuple[int, int], size: Tuple[int, int]) -> Image.Image:
        """An RGB region: ``location`` at level 0, ``size`` at ``level``. Transparent areas (outside
        the scanned area) become white, as glass is."""
        try:
            region = self.handle.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        except Exception as error:
            raise SlideError(
                f"cannot read {size[0]}x{size[1]} px at level {level}, ({location[0]}, {location[1]}): "
                f"{type(error).__name__}: {error}",
                slide=self.name,
            ) from None
        if isinstance(region, np.ndarray):
            region = Image.fromarray(region)
        return to_rgb(region)


def open_slide(slide: Any, *, reader: str = "auto") -> Slide:
    """Open ``slide`` (a path, or an object with OpenSlide's API) with errors that name it."""
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if not isinstance(slide, (str, os.PathLike)):
        return Slide(slide, describe_slide(slide), "object")
    path = os.fspath(slide)
    if not os.path.exists(path):
        raise SlideError("no such file", slide=path)
    if os.path.isdir(path):
        raise SlideError("is a folder, not a slide (pass the slide files, or a folder to embed_slides)", slide=path)
    if os.path.getsize(path) == 0:
        raise SlideError("the file is empty", slide=path)
    readers = _readers(reader)
    failures = []
    for name, opener in readers:
        try:
            return _checked(Slide(opener(path), path, name))
        except SlideError:
            raise
        except Exception as error:  # each library has its own "unsupported format" exceptions
            failures.append(f"{name}: {' '.join(str(error).split()) or type(error).__name__}")
    raise SlideError(
        "not a whole-slide image that " + " or ".join(n for n, _ in readers) + " can open (" + "; ".join(failures) + ")",
        slide=path,
    )


def _checked(slide: Slide) -> Slide:
    width, height = slide.dimensions
    if width <= 0 or height <= 0:
        raise SlideError(f"level 0 has no pixels ({width}x{height})", slide=slide.name)
    return slide


def _readers(reader: str):
    """The libraries to try, in order; ``auto`` uses every one that is installed."""
    found = []
    for name in ("openslide", "tiffslide"):
        if reader not in ("auto", name):
            continue
        try:
            if name == "openslide":
                import openslide

                found.append((name, openslide.OpenSlide))
            else:
                import tiffslide

                found.append((name, tiffslide.TiffSlide))
        except ImportError:
            if reader == name:
                raise OptionalDependencyError(name, extra="wsi", feature=f"Reading slides with {name}") from None
        except OSError as error:  # openslide-python present but its C library is not
            if reader == name:
                raise SlideError(f"{name} is installed but cannot load its library: {error}") from None
    if not found:
        raise OptionalDependencyError("openslide-python", extra="wsi", feature="Reading whole-slide images")
    return found


def mpp_from_properties(props: Dict[str, Any]) -> Optional[float]:
    """Level-0 µm/px from OpenSlide/tiffslide properties, Aperio's MPP, or the TIFF resolution tags."""
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        value = _positive_float(props.get(key))
        if value is not None:
            return value
    resolution = _positive_float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if resolution is not None and unit in _INCH_CM:
        return _INCH_CM[unit] / resolution
    return None


def _positive_float(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def describe_slide(slide: Any) -> str:
    if isinstance(slide, (str, os.PathLike)):
        return os.fspath(slide)
    return str(getattr(slide, "_filename", None) or getattr(slide, "path", None) or f"<{type(slide).__name__}>")


def is_slide_file(path: str, suffixes: Sequence[str] = tuple(SLIDE_SUFFIXES)) -> bool:
    return os.path.splitext(path)[1].lower() in suffixes
