"""Open whole-slide images with OpenSlide, tiffslide or any object with OpenSlide's API.

A ``SlideSource`` is what travels to DataLoader workers: the slide's path and the
reader's name, never an open handle (handles do not survive pickling, and a handle
shared across a fork is unsafe). Each process keeps a few slides open (a small LRU,
``set_open_slide_limit``; the least recently used is closed), opens them on first use,
never uses a handle its parent opened, and closes a slide's handles on ``release(path)``.
µm/px comes from the slide's own metadata or from the caller; it is never guessed
from a magnification.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import OptionalDependencyError, SlideError
from ..tiles import to_rgb
from . import stored_tiles
from .tiff_log import tifffile_notes

READERS = ("auto", "openslide", "tiffslide")
_INCH_CM = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "millimeter": 1000.0}
_API = ("level_count", "level_dimensions", "level_downsamples", "properties", "read_region")


FORK_WAIT = 10.0  # seconds a fork waits for other threads' slide library calls to end


class _ForkGuard:
    """A fork waits until no other thread is inside a slide library call (open, read, close).

    DataLoader workers are forked while other threads may be opening the next slide: a child
    forked in the middle of such a call inherits the library's locks (or a half-done import of
    it) held by a thread that does not exist in the child, and hangs on its first read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._forking = False
        self._local = threading.local()

    def __enter__(self) -> None:
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth:
            return  # already counted: a nested call must not wait for a fork that waits for it
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._active += 1

    def __exit__(self, *exc: Any) -> None:
        self._local.depth -= 1
        if self._local.depth:
            return
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def before_fork(self) -> None:
        self._cond.acquire()  # held across the fork, so no call starts meanwhile
        self._forking = True
        inside = getattr(self._local, "depth", 0) > 0  # the forking thread itself is in a call
        deadline = time.monotonic() + FORK_WAIT
        while self._active > inside and time.monotonic() < deadline:
            self._cond.wait(max(deadline - time.monotonic(), 0.0))

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()

    def after_fork_in_child(self) -> None:
        self.__init__()  # the other threads' calls do not exist here


_FORK_GUARD = _ForkGuard()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_FORK_GUARD.before_fork, after_in_parent=_FORK_GUARD.after_fork_in_parent,
                        after_in_child=_FORK_GUARD.after_fork_in_child)


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
        """This process's handle, from its small cache of open slides (see ``set_open_slide_limit``)."""
        if self.obj is not None:
            return Slide(self.obj, self.path, "object")
        return _HANDLES.get(self.path, self.reader)

    def close(self) -> None:
        """Close this process's handles of the slide (it reopens if used again)."""
        if self.obj is None:
            release(self.path)


class Slide:
    """A thin view over an OpenSlide-like handle: levels, µm/px, and RGB regions.

    A slide opened from a path can reopen its file: after a read error (OpenSlide keeps failing
    every later read on a handle that failed once), and after it was closed (released, or evicted
    from the cache of open slides), on next use. A handle is closed only when no read uses it.
    """

    def __init__(self, handle: Any, name: str, reader: str, *, reopen: Optional[Callable[[], Any]] = None):
        missing = [a for a in _API if not hasattr(handle, a)]
        if missing:
            raise SlideError(
                f"a {type(handle).__name__} is not a slide reader: it lacks {', '.join(missing)} "
                "(pass a path, an openslide.OpenSlide or a tiffslide.TiffSlide)",
                slide=name,
            )
        self._handle: Any = handle
        self.name = name
        self.reader = reader
        self.reopened = 0  # times a read error made this slide open its file afresh
        self._reopen = reopen
        self._lock = threading.Lock()
        self._busy = 0  # reads in flight
        self._retired: List[Any] = []  # handles replaced or closed while reads were using them
        self._stale = False  # the handle failed twice on one region: open afresh before the next read
        self._closed = False
        self.stamp: Any = None  # the file's size and mtime when opened (a replaced file is reopened)

    # -- the handle's life ---------------------------------------------------------------------

    @property
    def handle(self) -> Any:
        """The open library handle (reopened first if the slide was closed)."""
        handle = self._handle
        if handle is None or self._stale:
            handle = self._acquire()
            self._done()
        return handle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the library handle now, or when the reads using it end. A later use reopens it."""
        with self._lock:
            if self._reopen is None or self._handle is None:
                return  # a user's object is the user's to close
            self._retired.append(self._handle)
            self._handle, self._closed = None, True
            if not self._busy:
                self._close_retired()

    def _acquire(self) -> Any:
        revived = False
        with self._lock:
            if self._handle is None or self._stale:
                self._replace()
                revived, self._closed = self._closed, False
            self._busy += 1
            handle = self._handle
        if revived:  # counted among the open slides again (outside our lock: the cache closes slides)
            _HANDLES.add(self)
        return handle

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1
            if not self._busy:
                self._close_retired()

    def _replace(self) -> None:
        """Open the file afresh (caller holds the lock); the old handle closes when its reads end."""
        if self._reopen is None:
            raise SlideError("the slide was closed", slide=self.name)
        with _FORK_GUARD:
            fresh = self._reopen()
        if self._handle is not None:
            self._retired.append(self._handle)
        self._handle, self._stale = fresh, False

    def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for handle in retired:
            try:
                with _FORK_GUARD:
                    handle.close()
            except Exception:  # a handle that failed may fail to close; it is dropped either way
                pass

    # -- what the slide is -----------------------------------------------------------------------

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
        the scanned area) become white, as glass is.

        A failed read is retried once on a freshly opened handle (OpenSlide's errors are sticky: one
        bad tile would fail every later read of the handle); only then is it a ``SlideError``.
        """
        args = ((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        handle = self._acquire()
        try:
            try:
                with _FORK_GUARD:
                    region = handle.read_region(*args)
            except Exception as error:
                if self._reopen is None:
                    raise self._read_error(args, error) from None
                handle = self._fresh(handle)
                try:
                    with _FORK_GUARD:
                        region = handle.read_region(*args)
                except Exception as again:
                    with self._lock:
                        self._stale = self._stale or self._handle is handle
                    raise self._read_error(args, again) from None
        finally:
            self._done()
        if isinstance(region, np.ndarray):
            region = Image.fromarray(region)
        return to_rgb(region)

    def _fresh(self, failed: Any) -> Any:
        """A handle opened after ``failed`` failed (another thread may have reopened already)."""
        with self._lock:
            if self._handle is failed:
                try:
                    self._replace()
                except Exception as error:
                    self._stale = True
                    raise SlideError(f"cannot reopen the slide after a read error: {error}", slide=self.name) from None
                self.reopened += 1
            return self._handle

    def _read_error(self, args: Tuple[Any, ...], error: Exception) -> SlideError:
        (x, y), level, (w, h) = args
        said = " ".join(f"{type(error).__name__}: {error}".split())
        hint = "; the file looks truncated or corrupt: copy it again from its source" if _looks_truncated(said) else ""
        return SlideError(f"cannot read {w}x{h} px at level {level}, ({x}, {y}): {said}{hint}", slide=self.name)


# -- the open slides of this process -----------------------------------------------------------------

MAX_OPEN_SLIDES = 4  # handles one process keeps open; the least recently used one is closed first


class _OpenSlides:
    """A small per-process LRU of open slides. A forked child never uses (or closes) its parent's."""

    def __init__(self, limit: int = MAX_OPEN_SLIDES):
        self.limit = limit
        self._lock = threading.Lock()
        self._slides: "OrderedDict[Tuple[str, str], Slide]" = OrderedDict()
        self._pid = os.getpid()
        self._inherited: List[Slide] = []  # the parent's, kept referenced so that nothing closes them here

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by another thread at the fork
        self._inherited.extend(self._slides.values())
        self._slides = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str, reader: str) -> Slide:
        key = os.path.abspath(path)
        with self._lock:
            self._check_pid()
            stamp = _stamp(key)
            stale = []
            for (p, r), slide in list(self._slides.items()):
                if p == key and reader in ("auto", r):
                    if slide.stamp == stamp:
                        self._slides.move_to_end((p, r))
                        return slide
                    stale.append(self._slides.pop((p, r)))  # the file was replaced since it was opened
        for old in stale:
            old.close()
        slide = open_slide(path, reader=reader)
        slide.stamp = stamp  # outside the lock: opening can take a while
        with self._lock:
            self._check_pid()
            known = self._slides.get((key, slide.reader))
            if known is not None:  # another thread opened it meanwhile
                self._slides.move_to_end((key, slide.reader))
                duplicate, slide = slide, known
            else:
                duplicate = None
                self._slides[(key, slide.reader)] = slide
            evicted = self._trim()
        for other in evicted + ([duplicate] if duplicate else []):
            other.close()
        return slide

    def add(self, slide: Slide) -> None:
        """Count a reopened slide among the open ones again."""
        with self._lock:
            self._check_pid()
            self._slides[(os.path.abspath(slide.name), slide.reader)] = slide
            self._slides.move_to_end((os.path.abspath(slide.name), slide.reader))
            evicted = [s for s in self._trim() if s is not slide]
        for other in evicted:
            other.close()

    def release(self, path: str) -> int:
        key = os.path.abspath(path)
        with self._lock:
            self._check_pid()
            gone = [k for k in self._slides if k[0] == key]
            slides = [self._slides.pop(k) for k in gone]
        for slide in slides:
            slide.close()
        return len(slides)

    def clear(self) -> None:
        with self._lock:
            self._check_pid()
            slides, self._slides = list(self._slides.values()), OrderedDict()
        for slide in slides:
            slide.close()

    def count(self) -> int:
        with self._lock:
            self._check_pid()
            return sum(not s.closed for s in self._slides.values())

    def _trim(self) -> List[Slide]:
        evicted = []
        while len(self._slides) > max(self.limit, 1):
            evicted.append(self._slides.popitem(last=False)[1])
        return evicted

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:  # forked without the hook (it is registered where os allows)
            self.after_fork()


def _stamp(path: str) -> Any:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


_HANDLES = _OpenSlides()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HANDLES.after_fork)


def set_open_slide_limit(limit: int) -> int:
    """Keep at most ``limit`` slides open per process (default 4); returns the previous limit."""
    if not (isinstance(limit, int) and limit >= 1):
        raise ValueError(f"the open slide limit must be a positive integer, got {limit!r}")
    previous, _HANDLES.limit = _HANDLES.limit, limit
    with _HANDLES._lock:
        evicted = _HANDLES._trim()
    for slide in evicted:
        slide.close()
    return previous


def release(path: Union[str, os.PathLike]) -> int:
    """Let go of the slide at ``path`` in this process (when its tiles are read): close its handles,
    forget its stored-tile tables and decoded tiles. Returns how many handles were closed."""
    stored_tiles.release(os.fspath(path))
    return _HANDLES.release(os.fspath(path))


def release_all() -> None:
    """Close every slide this process holds open."""
    _HANDLES.clear()


def open_slide_count() -> int:
    """How many slides this process holds open (at most the limit)."""
    return _HANDLES.count()


def open_slide(slide: Any, *, reader: str = "auto") -> Slide:
    """Open ``slide`` (a path, or an object with OpenSlide's API) with errors that name it."""
    with _FORK_GUARD:  # imports the libraries on first use, and opening is their longest call
        return _open_slide(slide, reader)


def _open_slide(slide: Any, reader: str) -> Slide:
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if not isinstance(slide, (str, os.PathLike)):
        return Slide(slide, describe_slide(slide), "object")
    path = os.fspath(slide)
    if not os.path.exists(path):
        raise SlideError("no such file", slide=path)
    if os.path.isdir(path):
        return _open_dicom_folder(path, reader)
    if os.path.getsize(path) == 0:
        raise SlideError("the file is empty", slide=path)
    readers = _readers(reader)
    if reader == "auto" and len(readers) > 1 and _is_ome(path):
        readers = sorted(readers, key=lambda r: r[0] != "tiffslide")  # tiffslide reads OME's SubIFD levels
    failures = []
    with tifffile_notes() as notes:  # tifffile logs what it finds wrong: it goes into the error, not the log
        for name, opener in readers:
            try:
                return _checked(Slide(opener(path), path, name, reopen=functools.partial(opener, path)))
            except SlideError:
                raise
            except Exception as error:  # each library has its own "unsupported format" exceptions
                failures.append(f"{name}: {' '.join(str(error).split()) or type(error).__name__}")
    found = "; ".join(failures + [f"tifffile: {note}" for note in dict.fromkeys(notes)])
    if _looks_truncated(found):
        raise SlideError(f"the file looks truncated or corrupt ({os.path.getsize(path)} bytes; {found}): copy it "
                         "again from its source", slide=path)
    raise SlideError(
        "not a whole-slide image that " + " or ".join(n for n, _ in readers) + " can open (" + found + ")",
        slide=path,
    )


_TRUNCATION_WORDS = ("invalid offset", "invalid page offset", "out of range", "got 0 bytes", "empty input file",
                     "unexpected end", "premature end", "truncated", "read error")


def _looks_truncated(text: str) -> bool:
    text = text.lower()
    return any(word in text for word in _TRUNCATION_WORDS)


def _open_dicom_folder(path: str, reader: str) -> Slide:
    """A DICOM WSI folder: OpenSlide 4 opens the series from any of its ``.dcm`` files."""
    series = sorted(p for p in os.listdir(path) if p.lower().endswith(".dcm") and os.path.isfile(os.path.join(path, p)))
    if not series:
        raise SlideError("is a folder without .dcm files, not a slide (pass the slide files, or a folder to "
                         "embed_slides)", slide=path)
    if reader == "tiffslide":
        raise SlideError("is a DICOM slide, which tiffslide does not read: use reader='openslide' (OpenSlide 4)",
                         slide=path)
    ((_, opener),) = _readers("openslide")
    failures = []
    for name in series:  # a label or overview instance opens the series too; a broken file does not
        member = os.path.join(path, name)
        try:
            return _checked(Slide(opener(member), path, "openslide", reopen=functools.partial(opener, member)))
        except SlideError:
            raise
        except Exception as error:  # noqa: BLE001 - OpenSlide's "unsupported" and libdicom's errors
            failures.append(f"{name}: {' '.join(str(error).split()) or type(error).__name__}")
    raise SlideError(f"a folder of .dcm files that OpenSlide cannot open as a DICOM slide ({'; '.join(failures[:3])})",
                     slide=path)


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
    """Level-0 µm/px from OME-XML (PhysicalSizeX, in its unit), OpenSlide/tiffslide properties, Aperio's
    MPP, or the TIFF resolution tags."""
    ome = ome_mpp(props.get("tiff.ImageDescription"))
    if ome is not None:
        return ome
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        value = _positive_float(props.get(key))
        if value is not None:
            return value
    resolution = _positive_float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if resolution is not None and unit in _INCH_CM:
        return _INCH_CM[unit] / resolution
    return None


_OME_UNITS_UM = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3,
                 "pm": 1e-6, "Å": 1e-4}


def ome_mpp(description: Any) -> Optional[float]:
    """µm/px of the first image of an OME-XML description: PhysicalSizeX in PhysicalSizeXUnit (µm
    when absent, as the OME schema says), or None."""
    if not isinstance(description, str) or "<OME" not in description[:4096]:
        return None
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(description)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    size = _positive_float(pixels.get("PhysicalSizeX"))
    unit = _OME_UNITS_UM.get(pixels.get("PhysicalSizeXUnit", "µm"))
    return size * unit if size is not None and unit is not None else None


def _is_ome(path: str) -> bool:
    """An OME-TIFF: its pyramid is in SubIFDs, which OpenSlide does not read (it sees level 0 only)."""
    name = path.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return True
    if not name.endswith((".tif", ".tiff")):
        return False
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile_notes(), tifffile.TiffFile(path) as tif:  # a damaged file is the readers' to report
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the readers say what it is
        return False


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

