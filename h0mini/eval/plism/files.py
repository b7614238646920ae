"""Reading one slide's features (h5, npy with its sidecar, pt, plism-benchmark's layout) and finding them in a folder."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from ...errors import EvaluationInputError

PathLike = Union[str, Path]

FEATURE_SUFFIXES = (".h5", ".hdf5", ".npy", ".pt", ".pth")


@dataclass
class SlideFeatures:
    """Features of one slide, with what identifies its rows (coordinates, tile names) to check registration."""

    features: np.ndarray  # (n, d)
    coords: Optional[np.ndarray] = None  # (n, 2) or (n, c)
    source: Optional[str] = None
    tile_names: Optional[List[str]] = None  # the tile file of each row, as `h0mini embed` records it
    skipped: int = 0  # tiles left out when the slide was embedded (`h0mini embed --on-error skip`)
    output: Optional[str] = None  # the embedding's output mode from its provenance ("cls", "cls+mean"...)


PLISMBENCH_COORDS_COLUMNS = 3
"""Leading columns of plism-benchmark's ``<slide>/features.npy`` that are tile coordinates, not
features (its evaluation reads ``features[:, 3:]``)."""


def _is_plismbench_file(path: Path) -> bool:
    """plism-benchmark's ``<slide>/features.npy``: a bare array, no `h0mini embed` sidecar."""
    return path.name.lower() == "features.npy" and not path.with_name(path.name + ".json").exists()


def as_names(values: Any) -> List[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_npy_sidecar(path: Path) -> Dict[str, Any]:
    """The ``.npy.json`` sidecar `h0mini embed` writes beside a ``.npy`` (names, coords, provenance)."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return {}
    from ...model import file_sha256

    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError as error:
        raise EvaluationInputError(
            f"{str(sidecar)!r} (beside {str(path)!r}) is not valid JSON ({error}); delete it or re-run h0mini embed"
        ) from None
    if not isinstance(meta, dict):
        return {}
    if "npy_sha256" in meta and meta["npy_sha256"] != file_sha256(path):
        raise EvaluationInputError(
            f"{str(sidecar)!r} does not describe {str(path)!r} (an interrupted write?): its tile names may not "
            f"match the rows; re-run h0mini embed for this slide, or delete the sidecar to use the bare array"
        )
    return meta


def read_slide_file(path: PathLike, coords_columns: Optional[int]) -> SlideFeatures:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    coords = names = None
    provenance: Dict[str, Any] = {}
    skipped: Any = []
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise EvaluationInputError(f"{str(path)!r} has no 'features' dataset (found: {sorted(f.keys())})")
            features = f["features"][()]
            if "coords" in f:
                coords = f["coords"][()]
            if "tile_names" in f:
                names = as_names(f["tile_names"][()])
            try:
                provenance = json.loads(f.attrs.get("h0mini_provenance", "{}"))
                skipped = json.loads(f.attrs.get("skipped", "[]"))
            except (TypeError, ValueError):
                pass  # not an h0mini file: nothing to learn from its attributes
            if not isinstance(provenance, Mapping) or "output" not in provenance:
                provenance = {"output": as_names([f.attrs["output"]])[0]} if "output" in f.attrs else {}
    elif suffix == ".npy":
        features = np.load(path, allow_pickle=False)
        meta = _read_npy_sidecar(path)
        names = meta.get("tile_names")
        coords = meta.get("coords")
        provenance, skipped = meta.get("provenance") or {}, meta.get("skipped") or []
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping):
            if "features" not in obj:
                raise EvaluationInputError(f"{str(path)!r} holds a dict without a 'features' entry (keys: {sorted(obj)})")
            coords, names = obj.get("coords"), obj.get("tile_names")
            provenance, skipped = obj.get("provenance") or {}, obj.get("skipped") or []
            obj = obj["features"]
        features = obj
        if isinstance(features, torch.Tensor):
            features = features.float().numpy() if features.dtype == torch.bfloat16 else features.numpy()
        if isinstance(coords, torch.Tensor):
            coords = coords.numpy()
    else:
        raise EvaluationInputError(f"{str(path)!r}: unknown feature file type; use one of {FEATURE_SUFFIXES}")
    features = np.asarray(features)
    if features.ndim != 2:
        raise EvaluationInputError(f"{str(path)!r}: features must be 2-D (tiles, dim), got shape {features.shape}")
    if coords_columns is None:
        coords_columns = PLISMBENCH_COORDS_COLUMNS if suffix == ".npy" and _is_plismbench_file(path) else 0
    if coords_columns:
        if coords is not None:
            raise EvaluationInputError(f"{str(path)!r} has a 'coords' field; coords_columns applies to bare arrays only")
        if features.shape[1] <= coords_columns:
            raise EvaluationInputError(
                f"{str(path)!r} has {features.shape[1]} columns, not more than coords_columns={coords_columns} "
                f"(plism-benchmark's features.npy: 3 coordinate columns, then the features); pass coords_columns=0 "
                f"if every column is a feature"
            )
        coords, features = features[:, :coords_columns], features[:, coords_columns:]
    output = provenance.get("output") if isinstance(provenance, Mapping) else None
    return SlideFeatures(
        features=features,
        coords=None if coords is None else np.asarray(coords),
        source=str(path),
        tile_names=None if names is None else as_names(names),
        skipped=len(skipped) if isinstance(skipped, (list, tuple)) else 0,
        output=None if output is None else str(output),
    )


def output_warning(slide: SlideFeatures, name: str) -> Optional[str]:
    if slide.output is None or slide.output == "cls":
        return None
    where = repr(slide.source) if slide.source else f"slide {name!r}"
    return (
        f"{where} holds features of output mode {slide.output!r}, but the PLISM leaderboard (and its published "
        f"scores, H0-mini 0.541) uses the CLS token alone; re-embed with `h0mini embed ... --output-mode cls` "
        f"(or output='cls') to compare with them"
    )


def load_slide_features(path: PathLike, *, coords_columns: Optional[int] = None) -> SlideFeatures:
    """Read one slide's features from ``.h5``, ``.npy`` or ``.pt``.

    Args:
        path: an ``h0mini embed`` ``.h5`` file (datasets ``features`` (n, d), optional ``coords``
            and ``tile_names``), a ``.npy`` array (with the ``.npy.json`` sidecar ``h0mini embed``
            writes, if any), or a ``.pt`` file holding a tensor or a dict with ``features`` (and
            optionally ``coords``, ``tile_names``).
        coords_columns: leading columns of a ``.npy``/``.pt`` array that are tile coordinates, not
            features. Default: 3 for plism-benchmark's ``<slide>/features.npy`` (no sidecar), else 0.

    Returns:
        ``SlideFeatures`` with the features as stored (dtype kept), coordinates and tile names if
        any, how many tiles were skipped when embedding, and the provenance's output mode. A
        warning says when that mode is not ``"cls"`` (what the PLISM leaderboard uses).

    Raises:
        FileNotFoundError: the file does not exist.
        EvaluationInputError (a ValueError): unknown suffix, no ``features`` field, not a 2-D array,
            or a ``.npy`` sidecar that does not describe the array.
    """
    slide = read_slide_file(path, coords_columns)
    message = output_warning(slide, Path(path).stem)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    return slide


def find_feature_files(folder: PathLike) -> Dict[str, Path]:
    """Per-slide feature files in a folder, keyed by slide name.

    Two layouts are recognised: ``FOLDER/<slide>.{h5,npy,pt}`` (as ``h0mini embed`` writes one
    file per slide) and ``FOLDER/<slide>/features.{h5,npy,pt}`` (plism-benchmark's layout).

    Raises:
        FileNotFoundError: the folder does not exist or holds no feature file.
        EvaluationInputError (a ValueError): two files claim the same slide name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"feature folder {str(folder)!r} does not exist")
    found: Dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        if name in found:
            raise EvaluationInputError(f"slide {name!r} has two feature files: {str(found[name])!r} and {str(path)!r}")
        found[name] = path

    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in FEATURE_SUFFIXES:
            add(path.stem, path)
        elif path.is_dir():
            inner = [p for p in sorted(path.glob("features.*")) if p.suffix.lower() in FEATURE_SUFFIXES]
            if inner:
                add(path.name, inner[0])
    if not found:
        raise FileNotFoundError(
            f"no feature files in {str(folder)!r}: expected <slide>.h5/.npy/.pt or <slide>/features.npy"
        )
    return found


def basename(tile_name: str) -> str:
    return re.split(r"[\\/]", str(tile_name))[-1]


__all__ = [
    "FEATURE_SUFFIXES",
    "PLISMBENCH_COORDS_COLUMNS",
    "SlideFeatures",
    "find_feature_files",
    "load_slide_features",
    "output_warning",
    "read_slide_file",
    "as_names",
]
