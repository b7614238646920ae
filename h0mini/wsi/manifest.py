"""What a cohort run embeds: slides from paths or a manifest CSV, each with its own µm/px, mask and name.

A manifest has a ``slide`` column (a path, relative to the manifest's folder or absolute) and
optionally ``mpp``, ``mask`` and ``name``; every other column is kept as an attribute of the
slide's output. All bad rows (missing file, µm/px not > 0, a missing mask, a name used twice) are
listed together, before anything runs.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import SlideError, shown
from .discover import find_slides
from .discover import slide_path as as_slide
from .grid import slide_stem

MANIFEST_COLUMNS = ("slide", "mpp", "mask", "name")


@dataclass(frozen=True)
class SlideSpec:
    """One slide of a cohort: its path, the name of its outputs, and what overrides the run's settings."""

    path: str
    name: str
    mpp: Optional[float] = None  # level-0 µm/px, when the slide's metadata has none or is wrong
    mask: Optional[str] = None  # a tissue mask file, replacing tissue detection for this slide
    attributes: Dict[str, str] = field(default_factory=dict, compare=False)  # other manifest columns


class ManifestError(SlideError):
    """Rows of a manifest (or slides of a run) that cannot run: every one is listed."""


def is_manifest(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).lower().endswith(".csv")


def slide_specs(slides: Union[str, os.PathLike, Sequence[Any]], *, mpp: Optional[float] = None) -> List[SlideSpec]:
    """The slides of a run, in order, names checked unique: from a manifest, ``SlideSpec``s or paths."""
    items = [slides] if isinstance(slides, (str, os.PathLike)) else list(slides)
    specs: List[SlideSpec] = []
    paths: List[Any] = []
    for item in items:
        if isinstance(item, SlideSpec):
            specs.append(item)
        elif is_manifest(item):
            specs.extend(read_manifest(item, mpp=mpp))
        else:
            paths.append(item)
    if paths:
        specs.extend(SlideSpec(p, slide_stem(p), mpp) for p in find_slides(paths))
    if not specs:
        raise SlideError("no slides to embed")
    _check_unique(specs)
    return specs


def read_manifest(path: Union[str, os.PathLike], *, mpp: Optional[float] = None) -> List[SlideSpec]:
    """Read and check a manifest CSV; raises ``ManifestError`` listing every bad row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except FileNotFoundError:
        raise SlideError("no such manifest file", slide=str(path)) from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SlideError(f"cannot read the manifest ({error})", slide=str(path)) from None
    if not rows:
        raise ManifestError("the manifest has no rows (a header with a 'slide' column, then one row per slide)",
                            slide=str(path))
    if "slide" not in columns:
        raise ManifestError(f"the manifest has no 'slide' column (columns: {', '.join(columns)})", slide=str(path))
    base = path.parent
    problems: List[str] = []
    specs: List[SlideSpec] = []
    for number, raw in enumerate(rows, start=2):  # line numbers as an editor shows them (header is line 1)
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        where = f"line {number}"
        slide = row.get("slide", "")
        if not slide:
            problems.append(f"{where}: the 'slide' cell is empty")
            continue
        slide_path = as_slide(_resolve(slide, base))  # a .dcm of a DICOM series stands for its folder
        if not os.path.exists(slide_path):
            problems.append(f"{where}: {shown(slide)}: no such file or folder")
        row_mpp: Optional[float] = mpp
        if row.get("mpp"):
            try:
                row_mpp = float(row["mpp"])
            except ValueError:
                row_mpp = math.nan
            if not (math.isfinite(row_mpp) and row_mpp > 0):
                problems.append(f"{where}: mpp must be a positive number of µm/px, got {row['mpp']!r}")
        mask = None
        if row.get("mask"):
            mask = _resolve(row["mask"], base)
            if not os.path.isfile(mask):
                problems.append(f"{where}: mask {shown(row['mask'])}: no such file")
        name = row.get("name") or slide_stem(slide_path)
        if "/" in name or name in (".", ".."):
            problems.append(f"{where}: name {name!r} cannot be a file name")
        attributes = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS and k}
        specs.append(SlideSpec(slide_path, name, row_mpp, mask, attributes))
    try:
        _check_unique(specs)
    except ManifestError as error:
        problems.append(error.reason if hasattr(error, "reason") else str(error))
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) in the manifest; nothing was run:\n  "
                            + "\n  ".join(problems), slide=str(path))
    return specs


def _resolve(value: str, base: Path) -> str:
    path = Path(os.path.expanduser(value))
    return os.path.abspath(path if path.is_absolute() else base / path)


def _check_unique(specs: Sequence[SlideSpec]) -> None:
    """Two slides writing one output name are named together, all pairs at once."""
    seen: Dict[str, SlideSpec] = {}
    clashes = []
    for spec in specs:
        first = seen.setdefault(spec.name, spec)
        if first is not spec:
            if first.path == spec.path:
                clashes.append(f"{shown(spec.path)} is listed twice")
            else:
                clashes.append(f"{shown(first.path)} and {shown(spec.path)} would both write {spec.name}.h5")
    if clashes:
        raise ManifestError("slides share an output name (rename one, or give each a 'name' in a manifest): "
                            + "; ".join(clashes))


def slide_fingerprint(path: str) -> Dict[str, Any]:
    """What tells a slide file from another under the same name: its size and modification time
    (for a DICOM folder: of all its files). Level-0 dimensions are recorded with the tiling."""
    target = Path(path)
    if target.is_dir():
        files = [p for p in target.iterdir() if p.is_file()]
        stats = [p.stat() for p in files]
        return {"size": sum(s.st_size for s in stats), "mtime": round(max((s.st_mtime for s in stats), default=0), 3),
                "files": len(files)}
    stat = target.stat()
    return {"size": stat.st_size, "mtime": round(stat.st_mtime, 3)}
