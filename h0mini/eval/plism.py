"""PLISM robustness metrics, as the public plism-benchmark (owkin) defines them.

PLISM holds 91 registered slides of the same tissue: 13 H&E stainings x 7 scanners, so tile
``i`` shows the same cells in every slide. A stain- and scanner-robust model gives tile ``i``
nearly the same embedding in every slide. For each pair of slides (A, B), with matched
``(n, d)`` features:

* **cosine similarity**: ``mean_i cos(A_i, B_i)``.
* **top-k accuracy** (k = 1, 3, 5, 10): pool the ``2n`` rows of A and B; for each row, rank
  every *other* row by cosine similarity (the row itself is masked out). ``A_i`` hits when
  ``B_i`` is among its k nearest, and symmetrically for ``B_i``; the accuracy is the mean of
  the two directions' hit rates.

The 4,095 slide pairs fall into groups read from the slide names (``<staining>_<scanner>``):
*cross-scanner* (same staining, 273 pairs), *cross-staining* (same scanner, 546),
*cross-both* (3,276) and *all*. Each group is summarised by mean, std, median and IQR, and
the leaderboard score is the mean of the median cosine over all pairs and the median top-10
accuracy of the three cross groups.

Precision. The benchmark stores features in float16 and compares them in float16. Here the
features are rounded to float16 exactly as it does (``precision="float16"``, the default),
which is the step that defines the number; the arithmetic after it (normalisation, dot
products, comparisons) runs in float32, on CPU and GPU alike, so that results do not depend on
the device and that ranks are not tied by float16 rounding of the similarities. The
difference to an all-float16 computation is below 1e-3 on the cosine (the precision at which
the leaderboard is published). ``precision="float32"`` skips the rounding.

Ranking rule. A hit means fewer than ``k`` other rows are *strictly* more similar than the
matched one. The benchmark sorts with ``argpartition``, whose order among exactly equal
similarities is unspecified; the two agree whenever no similarity ties the matched one, which
for real features happens only with duplicated tiles.

Memory and speed. Nothing of size ``2n x 2n`` is ever built. Each slide's within-slide
neighbours (the ``A·Aᵀ`` block, needed for every pair the slide is in) are reduced once to the
``max(k)`` largest similarities per row; each pair then needs one ``n x n`` product,
computed in blocks of ``chunk_size`` rows. Peak memory per pair is about
``3 * chunk_size * n * 4`` bytes beside the features; the whole benchmark costs about
``(pairs + slides) * 2 n² d`` flops (91 slides x 8,139 tiles x 768: 4.3e14).
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import runtime
from ..errors import EvaluationInputError, OptionalDependencyError

PathLike = Union[str, Path]
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]

TOP_K: Tuple[int, ...] = (1, 3, 5, 10)
"""The k values of the benchmark's top-k accuracies."""

PLISM_STAININGS: Tuple[str, ...] = (
    "GIV", "GIVH", "GM", "GMH", "GV", "GVH", "HR", "HRH", "KR", "KRH", "LM", "LMH", "MY",
)  # fmt: skip
"""The 13 staining codes of PLISM slide names."""

PLISM_SCANNERS: Tuple[str, ...] = ("AT2", "GT450", "P", "S210", "S360", "S60", "SQ")
"""The 7 scanner codes of PLISM slide names."""

PLISM_NUM_TILES = 8_139
"""Tiles per slide used by the leaderboard (half of the 16,278 extracted)."""

SLIDE_PATTERN = r"^(?P<staining>[A-Za-z0-9]+)_(?P<scanner>[A-Za-z0-9]+)"
"""Default slide-name pattern: ``<staining>_<scanner>``, anything after is ignored
(``GIVH_AT2``, ``GIVH_AT2_to_GMH_S60.tif``). The benchmark splits names on ``_`` the same way."""

GROUPS: Tuple[str, ...] = ("cross-scanner", "cross-staining", "cross-both", "all")
"""Pair groups, in the benchmark's order. A pair of two slides with the same staining *and*
scanner (a replicate scan, absent from PLISM) is labelled ``replicate`` and counts only in
``all``."""

STATISTICS: Tuple[str, ...] = ("mean", "std", "median", "iqr")

FEATURE_SUFFIXES = (".h5", ".hdf5", ".npy", ".pt", ".pth")


def import_optional(package: str, feature: str) -> Any:
    """Import an optional dependency of ``h0mini[eval]`` or say how to install it.

    Raises:
        OptionalDependencyError: the package is not installed.
    """
    module = {"scikit-learn": "sklearn"}.get(package, package)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise OptionalDependencyError(package, extra="eval", feature=feature) from error


def metric_names(ks: Sequence[int] = TOP_K) -> List[str]:
    """Column names of the metrics: ``cosine_similarity``, then ``top_{k}_accuracy`` per k."""
    return ["cosine_similarity"] + [f"top_{k}_accuracy" for k in ks]


# --------------------------------------------------------------------------------------------
# Input checking and preparation


def _check_ks(ks: Iterable[int], n: int) -> Tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise EvaluationInputError("ks must name at least one k")
    bad = [k for k in ks if k < 1]
    if bad:
        raise EvaluationInputError(f"top-k needs k >= 1, got {bad}")
    too_big = [k for k in ks if k > 2 * n - 1]
    if too_big:
        raise EvaluationInputError(
            f"top-k with {n} tiles per slide allows k up to 2n-1 = {2 * n - 1}, got {too_big}; "
            f"use more tiles or smaller k"
        )
    return ks


def _as_matrix(x: ArrayLike, name: str, field: str = "features") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.ndim != 2:
        raise EvaluationInputError(f"slide {name!r}: {field} must be a 2-D array (tiles, dim), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise EvaluationInputError(f"slide {name!r}: {field} is empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise EvaluationInputError(f"slide {name!r}: {field} must be real numbers, got dtype {array.dtype}")
    return array


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None`` is the CPU (metrics are cheap); otherwise as everywhere in h0mini (``"auto"``, ``"cuda:1"``...)."""
    return torch.device("cpu") if device is None else runtime.resolve_device(device)


def _check_finite(array: np.ndarray, name: str, what: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        count = int((~finite.all(axis=1)).sum())
        raise EvaluationInputError(
            f"slide {name!r}: {what} has non-finite values (NaN or inf) in {count} tile(s), "
            f"first at tile {row}, dimension {col} ({array[row, col]})"
        )


def prepare_features(
    features: ArrayLike,
    *,
    name: str = "features",
    precision: str = "float16",
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Round to the benchmark's precision and L2-normalise the rows.

    Args:
        features: ``(n, d)`` features of one slide.
        name: the slide's name, used in error messages.
        precision: ``"float16"`` (round as the benchmark stores features) or ``"float32"``.
        device: torch device of the result, or ``"auto"``. Default: CPU.

    Returns:
        ``(n, d)`` float32 tensor of unit rows on ``device``.

    Raises:
        EvaluationInputError (a ValueError): not 2-D, empty, NaN/inf (naming the tile), beyond float16 range, or a zero row.
    """
    if precision not in ("float16", "float32"):
        raise EvaluationInputError(f"precision must be 'float16' or 'float32', got {precision!r}")
    array = _as_matrix(features, name)
    _check_finite(array, name, "features")
    if precision == "float16":
        with np.errstate(over="ignore"):  # overflow is reported below, naming the tile
            rounded = array.astype(np.float16)
        if not np.isfinite(rounded).all():
            row = int(np.argwhere(~np.isfinite(rounded))[0][0])
            raise EvaluationInputError(
                f"slide {name!r}: features of tile {row} exceed the float16 range (|x| > 65504), "
                f"which the benchmark uses; rescale them or pass precision='float32'"
            )
        array = rounded
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(resolve_device(device))
    norms = torch.linalg.vector_norm(tensor, dim=1, keepdim=True)
    zero = (norms[:, 0] == 0).nonzero()
    if len(zero):
        raise EvaluationInputError(
            f"slide {name!r}: tile {int(zero[0, 0])} has an all-zero feature vector; its cosine "
            f"similarity is undefined ({len(zero)} such tile(s))"
        )
    return tensor / norms


def _self_top(unit: torch.Tensor, kmax: int, chunk_size: int) -> torch.Tensor:
    """The ``kmax`` largest similarities of each row to the *other* rows of the same slide."""
    n = unit.shape[0]
    keep = min(kmax, n - 1)
    out = torch.empty((n, keep), dtype=unit.dtype, device=unit.device)
    if keep == 0:
        return out
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start, device=unit.device)
        block[rows, rows + start] = -math.inf
        out[start:stop] = torch.topk(block, keep, dim=1, sorted=False).values
    return out


def _pair_ranks(
    unit_a: torch.Tensor,
    unit_b: torch.Tensor,
    top_a: torch.Tensor,
    top_b: torch.Tensor,
    chunk_size: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matched cosines and, per direction, how many other pooled rows beat the matched one."""
    n = unit_a.shape[0]
    matched = (unit_a * unit_b).sum(dim=1)
    rank_a = torch.count_nonzero(top_a > matched[:, None], dim=1)
    rank_b = torch.count_nonzero(top_b > matched[:, None], dim=1)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = unit_a[start:stop] @ unit_b.T  # rows: tiles of A; columns: tiles of B
        rows = torch.arange(stop - start, device=block.device)
        block[rows, rows + start] = -math.inf  # the matched tile is the target, not a competitor
        rank_a[start:stop] += torch.count_nonzero(block > matched[start:stop, None], dim=1)
        rank_b += torch.count_nonzero(block > matched[None, :], dim=0)
    return matched, rank_a, rank_b


def _metrics_from_ranks(
    matched: torch.Tensor, rank_a: torch.Tensor, rank_b: torch.Tensor, ks: Sequence[int]
) -> Dict[str, float]:
    out = {"cosine_similarity": float(matched.double().mean())}
    for k in ks:
        hits_a = (rank_a < k).double().mean()
        hits_b = (rank_b < k).double().mean()
        out[f"top_{k}_accuracy"] = float((hits_a + hits_b) / 2)
    return out


# --------------------------------------------------------------------------------------------
# One pair of slides


def pair_metrics(
    a: ArrayLike,
    b: ArrayLike,
    *,
    ks: Sequence[int] = TOP_K,
    precision: str = "float16",
    chunk_size: int = 2048,
    device: Union[str, torch.device, None] = None,
    names: Tuple[str, str] = ("a", "b"),
) -> Dict[str, float]:
    """Cosine similarity and top-k accuracies between two slides' matched features.

    Args:
        a, b: ``(n, d)`` features; row ``i`` of both is the same tissue.
        ks: the k of the top-k accuracies. Each must be at most ``2n - 1``.
        precision: ``"float16"`` (the benchmark's rounding, default) or ``"float32"``.
        chunk_size: rows per similarity block (memory ``~3 * chunk_size * n * 4`` bytes).
        device: torch device for the arithmetic (``"cuda"``, or ``"auto"`` for CUDA when available).
            Default: CPU.
        names: names of the two slides in error messages.

    Returns:
        ``{"cosine_similarity": ..., "top_1_accuracy": ..., ...}`` as Python floats.

    Raises:
        EvaluationInputError (a ValueError): shapes differ, non-finite or zero features, or a k out of range.

    Example:
        >>> pair_metrics([[0, 1], [1, 0], [1, 1], [1, 1]], [[0, 2], [2, 0], [-1, -1], [0, 1]], ks=(1,))
        {'cosine_similarity': 0.4267766..., 'top_1_accuracy': ...}
    """
    if chunk_size < 1:
        raise EvaluationInputError(f"chunk_size must be >= 1, got {chunk_size}")
    unit_a = prepare_features(a, name=names[0], precision=precision, device=device)
    unit_b = prepare_features(b, name=names[1], precision=precision, device=device)
    _check_same_shape(unit_a.shape, unit_b.shape, names)
    ks = _check_ks(ks, unit_a.shape[0])
    kmax = max(ks)
    top_a = _self_top(unit_a, kmax, chunk_size)
    top_b = _self_top(unit_b, kmax, chunk_size)
    return _metrics_from_ranks(*_pair_ranks(unit_a, unit_b, top_a, top_b, chunk_size), ks)


def cosine_similarity(a: ArrayLike, b: ArrayLike, *, precision: str = "float16") -> float:
    """Mean cosine similarity of matched rows, ``mean_i cos(a_i, b_i)`` (see ``pair_metrics``)."""
    unit_a = prepare_features(a, name="a", precision=precision)
    unit_b = prepare_features(b, name="b", precision=precision)
    _check_same_shape(unit_a.shape, unit_b.shape, ("a", "b"))
    return float((unit_a * unit_b).sum(dim=1).double().mean())


def top_k_accuracy(
    a: ArrayLike,
    b: ArrayLike,
    ks: Sequence[int] = TOP_K,
    *,
    precision: str = "float16",
    chunk_size: int = 2048,
    device: Union[str, torch.device, None] = None,
) -> Dict[int, float]:
    """Top-k retrieval accuracy of matched rows over the pooled ``2n`` rows (see ``pair_metrics``).

    Returns:
        ``{k: accuracy}``.
    """
    metrics = pair_metrics(a, b, ks=ks, precision=precision, chunk_size=chunk_size, device=device)
    return {int(k): metrics[f"top_{k}_accuracy"] for k in ks}


def _check_same_shape(shape_a: Sequence[int], shape_b: Sequence[int], names: Tuple[str, str]) -> None:
    if shape_a[0] != shape_b[0]:
        raise EvaluationInputError(
            f"slide {names[1]!r} has {shape_b[0]} tiles but slide {names[0]!r} has {shape_a[0]}: "
            f"PLISM metrics compare matched tiles, so every slide needs the same tiles in the same order"
        )
    if shape_a[1] != shape_b[1]:
        raise EvaluationInputError(
            f"slide {names[1]!r} has {shape_b[1]}-d features but slide {names[0]!r} has {shape_a[1]}-d"
        )


# --------------------------------------------------------------------------------------------
# Slide names and pair groups


def parse_slide_name(name: str, pattern: Union[str, "re.Pattern[str]"] = SLIDE_PATTERN) -> Tuple[str, str]:
    """Read the staining and scanner codes from a slide name.

    Args:
        name: e.g. ``"GIVH_AT2"`` or ``"GIVH_AT2_to_GMH_S60.tif"``.
        pattern: a regex with named groups ``staining`` and ``scanner``, matched with ``re.match``
            at the start of the name. Default: ``<staining>_<scanner>``.

    Returns:
        ``(staining, scanner)``.

    Raises:
        EvaluationInputError (a ValueError): the name does not match, or the pattern lacks the named groups.
    """
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    missing = {"staining", "scanner"} - set(regex.groupindex)
    if missing:
        raise EvaluationInputError(f"slide-name pattern {regex.pattern!r} needs the named groups {sorted(missing)}")
    match = regex.match(name)
    if match is None or not match.group("staining") or not match.group("scanner"):
        raise EvaluationInputError(
            f"slide {name!r} does not match the slide-name pattern {regex.pattern!r}; name slides "
            f"'<staining>_<scanner>...' (PLISM: 'GIVH_AT2') or pass slide_pattern= with named groups "
            f"'staining' and 'scanner'"
        )
    return match.group("staining"), match.group("scanner")


def pair_group(staining_a: str, scanner_a: str, staining_b: str, scanner_b: str) -> str:
    """``cross-scanner``, ``cross-staining``, ``cross-both`` or ``replicate`` for one slide pair."""
    same_staining, same_scanner = staining_a == staining_b, scanner_a == scanner_b
    if same_staining and same_scanner:
        return "replicate"
    if same_staining:
        return "cross-scanner"
    if same_scanner:
        return "cross-staining"
    return "cross-both"


def slide_pairs(names: Iterable[str], *, slide_pattern: Union[str, "re.Pattern[str]"] = SLIDE_PATTERN) -> Any:
    """All unordered pairs of slides with their staining, scanner and group.

    Args:
        names: slide names (at least two, unique).
        slide_pattern: see ``parse_slide_name``.

    Returns:
        A pandas DataFrame with columns ``slide_a``, ``slide_b``, ``staining_a``, ``scanner_a``,
        ``staining_b``, ``scanner_b``, ``group``; ``C(len(names), 2)`` rows in sorted name order.

    Raises:
        EvaluationInputError (a ValueError): fewer than two slides, a duplicate name, or an unparsable name.
    """
    pd = import_optional("pandas", "PLISM pair tables")
    names = sorted(names)
    if len(names) < 2:
        raise EvaluationInputError(f"PLISM metrics compare pairs of slides; got {len(names)} slide(s)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationInputError(f"duplicate slide names: {duplicates}")
    meta = {name: parse_slide_name(name, slide_pattern) for name in names}
    rows = []
    for slide_a, slide_b in itertools.combinations(names, 2):
        (st_a, sc_a), (st_b, sc_b) = meta[slide_a], meta[slide_b]
        rows.append((slide_a, slide_b, st_a, sc_a, st_b, sc_b, pair_group(st_a, sc_a, st_b, sc_b)))
    columns = ["slide_a", "slide_b", "staining_a", "scanner_a", "staining_b", "scanner_b", "group"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------
# Reading per-slide features


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


def _names(values: Any) -> List[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_npy_sidecar(path: Path) -> Dict[str, Any]:
    """The ``.npy.json`` sidecar `h0mini embed` writes beside a ``.npy`` (names, coords, provenance)."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return {}
    from ..model import file_sha256

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


def _read_slide_file(path: PathLike, coords_columns: Optional[int]) -> SlideFeatures:
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
                names = _names(f["tile_names"][()])
            try:
                provenance = json.loads(f.attrs.get("h0mini_provenance", "{}"))
                skipped = json.loads(f.attrs.get("skipped", "[]"))
            except (TypeError, ValueError):
                pass  # not an h0mini file: nothing to learn from its attributes
            if not isinstance(provenance, Mapping) or "output" not in provenance:
                provenance = {"output": _names([f.attrs["output"]])[0]} if "output" in f.attrs else {}
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
        tile_names=None if names is None else _names(names),
        skipped=len(skipped) if isinstance(skipped, (list, tuple)) else 0,
        output=None if output is None else str(output),
    )


def _output_warning(slide: SlideFeatures, name: str) -> Optional[str]:
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
    slide = _read_slide_file(path, coords_columns)
    message = _output_warning(slide, Path(path).stem)
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


def _basename(tile_name: str) -> str:
    return re.split(r"[\\/]", str(tile_name))[-1]


def _tile_key(tile_name: str, slide: str) -> str:
    """What must agree between slides: the file name, without the slide's own name in it.

    Tiles of different slides live in different folders (``GM_P/tile_3.png``) or carry the slide
    name (``GM_P_x224_y0.png``); the rest of the name identifies the tissue.
    """
    base = _basename(tile_name)
    return base.replace(slide, "") if slide else base


class _SlideStore:
    """Normalised features of each slide on the device, loaded on demand, at most ``capacity`` kept."""

    def __init__(
        self,
        sources: Mapping[str, Any],
        *,
        precision: str,
        device: torch.device,
        kmax: int,
        chunk_size: int,
        tile_indices: Optional[np.ndarray],
        coords_columns: Optional[int],
        check_coords: bool,
        capacity: Optional[int],
    ):
        self.sources = sources
        self.precision = precision
        self.device = device
        self.kmax = kmax
        self.chunk_size = chunk_size
        self.tile_indices = tile_indices
        self.coords_columns = coords_columns
        self.check_coords = check_coords
        self.capacity = capacity
        self.cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.self_top: Dict[str, torch.Tensor] = {}  # small: (n, kmax) per slide, kept for all
        self.reference: Optional[Tuple[str, Tuple[int, int]]] = None
        self.reference_coords: Optional[Tuple[str, np.ndarray]] = None  # first slide with coordinates
        self.reference_names: Optional[Tuple[str, List[str], List[str]]] = None  # first with tile names: keys, names
        self.warned: set = set()  # one warning per kind and slide, and one per run for the output mode

    def _read(self, name: str) -> SlideFeatures:
        source = self.sources[name]
        if isinstance(source, SlideFeatures):
            return source
        if isinstance(source, (str, Path)):
            return _read_slide_file(source, self.coords_columns)
        if isinstance(source, Mapping):
            if "features" not in source:
                raise EvaluationInputError(f"slide {name!r}: a mapping value needs a 'features' entry (keys: {sorted(source)})")
            coords, names = source.get("coords"), source.get("tile_names")
            features = _as_matrix(source["features"], name)
            return SlideFeatures(
                features, None if coords is None else np.asarray(coords), tile_names=None if names is None else _names(names)
            )
        array = _as_matrix(source, name)
        if self.coords_columns:
            return SlideFeatures(array[:, self.coords_columns:], array[:, : self.coords_columns])
        return SlideFeatures(array)

    def _warn_once(self, key: Any, message: str, stacklevel: int) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)

    def get(self, name: str) -> torch.Tensor:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        slide = self._read(name)
        message = _output_warning(slide, name)
        if message:
            self._warn_once("output", message + " (warned once per run)", stacklevel=3)  # evaluate_slides' caller
        features, coords, names = _as_matrix(slide.features, name), slide.coords, slide.tile_names
        for field_name, rows in (("coords", coords), ("tile_names", names)):
            if rows is not None and len(rows) != features.shape[0]:
                raise EvaluationInputError(
                    f"slide {name!r}: field {field_name!r} has {len(rows)} rows but 'features' has {features.shape[0]}"
                )
        if coords is not None:
            coords = np.asarray(coords)
        if self.tile_indices is not None:
            if len(features) <= int(self.tile_indices.max()):
                raise EvaluationInputError(
                    f"slide {name!r} has {len(features)} tiles; tile_indices asks for tile {int(self.tile_indices.max())}"
                )
            features = features[self.tile_indices]
            coords = None if coords is None else coords[self.tile_indices]
            names = None if names is None else [names[i] for i in self.tile_indices]
        self._check_registration(name, features.shape, coords, names, slide)
        unit = prepare_features(features, name=name, precision=self.precision, device=self.device)
        if name not in self.self_top:
            self.self_top[name] = _self_top(unit, self.kmax, self.chunk_size)
        self.cache[name] = unit
        if self.capacity is not None:
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return unit

    def _check_registration(
        self,
        name: str,
        shape: Tuple[int, int],
        coords: Optional[np.ndarray],
        names: Optional[List[str]],
        slide: SlideFeatures,
    ) -> None:
        if self.reference is None:
            self.reference = (name, tuple(shape))
        else:
            _check_same_shape(self.reference[1], shape, (self.reference[0], name))
        if slide.skipped and (not self.check_coords or (coords is None and names is None)):
            why = "check_coords=False is set" if not self.check_coords else "it has no tile names or coordinates"
            self._warn_once(
                ("skipped", name),
                f"slide {name!r} ({slide.source or 'in memory'}): {slide.skipped} tile(s) skipped when it was "
                f"embedded (h0mini embed --on-error skip), and {why}, so nothing checks that its rows are the same "
                f"tiles as the other slides'; the metrics are wrong if they are not. Re-embed the skipped tiles, or "
                f"drop them from every slide",
                stacklevel=4,
            )
        if not self.check_coords:
            return
        compared = False
        if coords is not None:
            if self.reference_coords is None:  # coordinates are compared with the first slide that has them
                self.reference_coords = (name, coords)
            else:
                self._compare_coords(name, coords)
                compared = True
        if names is not None:
            keys = [_tile_key(n, name) for n in names]
            if self.reference_names is None:
                self.reference_names = (name, keys, names)
            elif not compared:  # equal coordinates already prove the rows match, whatever the file names
                self._compare_names(name, keys, names)

    def _compare_coords(self, name: str, coords: np.ndarray) -> None:
        ref_name, ref_coords = self.reference_coords  # type: ignore[misc]
        if coords.shape != ref_coords.shape:
            raise EvaluationInputError(
                f"slide {name!r}: field 'coords' has shape {coords.shape}, slide {ref_name!r} {ref_coords.shape}"
            )
        if not np.array_equal(coords, ref_coords):
            row = int(np.argwhere((coords != ref_coords).reshape(len(coords), -1).any(axis=1))[0][0])
            raise EvaluationInputError(
                f"slide {name!r}: field 'coords' differs from slide {ref_name!r} at tile {row} "
                f"({coords[row].tolist()} vs {ref_coords[row].tolist()}): the tiles are not registered "
                f"(same tissue, same order) across slides; pass check_coords=False to compare anyway"
            )

    def _compare_names(self, name: str, keys: List[str], names: List[str]) -> None:
        ref_name, ref_keys, ref_names = self.reference_names  # type: ignore[misc]
        row = next((i for i, (a, b) in enumerate(zip(keys, ref_keys)) if a != b), None)
        if row is None:
            return
        raise EvaluationInputError(
            f"slide {name!r}: field 'tile_names' differs from slide {ref_name!r} at tile {row} "
            f"({_basename(names[row])!r} vs {_basename(ref_names[row])!r}): the tiles are not registered (same tissue, "
            f"same order) across slides, e.g. a tile skipped by `h0mini embed --on-error skip` in one slide only; "
            f"embed the same tiles for every slide, or pass check_coords=False to compare anyway"
        )


def _blocked_pairs(names: Sequence[str], block: int) -> Iterator[Tuple[str, str]]:
    """All pairs ``(a, b)`` with ``a < b``, visited block by block so that a cache of ``2 * block``
    slides loads each slide about ``len(names) / block`` times instead of once per pair."""
    blocks = [names[i : i + block] for i in range(0, len(names), block)]
    for i, first in enumerate(blocks):
        for second in blocks[i:]:
            for a in first:
                for b in second:
                    if a < b:
                        yield a, b


def evaluate_slides(
    features: Union[PathLike, Mapping[str, Any]],
    *,
    ks: Sequence[int] = TOP_K,
    slide_pattern: Union[str, "re.Pattern[str]"] = SLIDE_PATTERN,
    precision: str = "float16",
    chunk_size: int = 2048,
    device: Union[str, torch.device, None] = "auto",
    tile_indices: Optional[Sequence[int]] = None,
    coords_columns: Optional[int] = None,
    check_coords: bool = True,
    max_slides_in_memory: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Any:
    """PLISM metrics for every pair of slides.

    Args:
        features: a folder of per-slide feature files (see ``find_feature_files``), or a mapping
            ``{slide_name: features}`` whose values are ``(n, d)`` arrays/tensors, dicts with
            ``features`` (and optional ``coords``, ``tile_names``), ``SlideFeatures`` or file paths.
        ks: the k of the top-k accuracies.
        slide_pattern: regex with named groups ``staining`` and ``scanner`` (see ``parse_slide_name``).
        precision: ``"float16"`` (benchmark, default) or ``"float32"``.
        chunk_size: rows per similarity block.
        device: torch device for the arithmetic. Default ``"auto"``: CUDA when available, else CPU.
        tile_indices: use only these tiles of every slide (the leaderboard uses a fixed subset of
            8,139 of 16,278 tiles).
        coords_columns: leading columns of bare arrays that are coordinates. Default: 3 for
            plism-benchmark's ``<slide>/features.npy`` files (no ``h0mini embed`` sidecar), else 0.
            An explicit value applies to every file and in-memory array.
        check_coords: require the slides' rows to be the same tiles: identical coordinates when
            slides carry them, else identical tile file names (``h0mini embed`` records them;
            folders and the slide's own name in the file name are ignored). A warning names a
            slide whose file records skipped tiles that cannot be checked this way.
        max_slides_in_memory: keep at most this many slides' features on the device (at least 2).
            Default: all (91 x 8,139 x 768 float32 is 2.3 GB).
        progress: progress bar over pairs on stderr. Default: only when stderr is a terminal.

    Returns:
        A pandas DataFrame, one row per pair: the ``slide_pairs`` columns plus
        ``cosine_similarity`` and ``top_{k}_accuracy`` per k.

    Raises:
        EvaluationInputError (a ValueError): an unparsable slide name, mismatched tile counts, coordinates or tile
            names, NaN features (all naming the slide), or bad arguments.
        FileNotFoundError: the folder or a feature file does not exist.
    """
    if isinstance(features, (str, Path)):
        sources: Mapping[str, Any] = find_feature_files(features)
    elif isinstance(features, Mapping):
        sources = dict(features)
    else:
        raise TypeError(f"features must be a folder or a mapping of slide name to features, got {type(features).__name__}")
    if chunk_size < 1:
        raise EvaluationInputError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_slides_in_memory is not None and max_slides_in_memory < 2:
        raise EvaluationInputError(f"max_slides_in_memory must be at least 2, got {max_slides_in_memory}")
    pairs = slide_pairs(sources.keys(), slide_pattern=slide_pattern)
    names = sorted(sources)
    indices = None
    if tile_indices is not None:
        indices = np.asarray(tile_indices, dtype=np.int64)
        if indices.ndim != 1 or len(indices) == 0 or indices.min() < 0:
            raise EvaluationInputError("tile_indices must be a non-empty 1-D sequence of non-negative integers")
    if coords_columns is not None and coords_columns < 0:
        raise EvaluationInputError(f"coords_columns must be >= 0, got {coords_columns}")
    torch_device = resolve_device(device)
    ks = _check_ks(ks, sys.maxsize)  # k >= 1 now; k <= 2n - 1 once the tile count is known
    store = _SlideStore(
        sources,
        precision=precision,
        device=torch_device,
        kmax=max(ks),
        chunk_size=chunk_size,
        tile_indices=indices,
        coords_columns=coords_columns,
        check_coords=check_coords,
        capacity=max_slides_in_memory,
    )
    n_tiles = store.get(names[0]).shape[0]
    ks = _check_ks(ks, n_tiles)
    block = len(names) if max_slides_in_memory is None else max(1, max_slides_in_memory // 2)
    order = {pair: i for i, pair in enumerate(zip(pairs["slide_a"], pairs["slide_b"]))}
    results: List[Optional[Dict[str, float]]] = [None] * len(order)
    bar = _progress_bar(progress, total=len(order), unit="pair", desc="PLISM pairs")
    try:
        with torch.inference_mode():
            for a, b in _blocked_pairs(names, block):
                unit_a, unit_b = store.get(a), store.get(b)
                ranks = _pair_ranks(unit_a, unit_b, store.self_top[a], store.self_top[b], chunk_size)
                results[order[(a, b)]] = _metrics_from_ranks(*ranks, ks)
                bar.update(1)
    finally:
        bar.close()
    for name in metric_names(ks):
        pairs[name] = [r[name] for r in results]  # type: ignore[index]
    return pairs


def _progress_bar(progress: Optional[bool], *, total: int, unit: str, desc: str) -> Any:
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, disable=not show, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Aggregates and the leaderboard score


def _group_mask(pairs: Any, group: str) -> Any:
    if group == "all":
        return np.ones(len(pairs), dtype=bool)
    if group not in GROUPS:
        raise EvaluationInputError(f"unknown group {group!r}; choose from {GROUPS}")
    return (pairs["group"] == group).to_numpy()


def aggregate(
    pairs: Any,
    *,
    groups: Sequence[str] = GROUPS,
    metrics: Optional[Sequence[str]] = None,
) -> Any:
    """Mean, std, median and IQR of each metric per pair group, as the benchmark reports them.

    ``std`` is the population standard deviation (``ddof=0``) and the IQR is
    ``quantile(0.75) - quantile(0.25)`` with linear interpolation, both as in plism-benchmark.

    Args:
        pairs: the DataFrame from ``evaluate_slides``.
        groups: which groups to summarise.
        metrics: metric columns. Default: ``cosine_similarity`` and every ``top_*_accuracy``.

    Returns:
        A DataFrame indexed by group with an ``n_pairs`` column and ``{metric}_{stat}`` columns.

    Raises:
        EvaluationInputError (a ValueError): a requested group has no pair (naming it and the slides' stainings/scanners),
            an unknown group, or a missing metric column.
    """
    pd = import_optional("pandas", "PLISM aggregates")
    if metrics is None:
        metrics = [c for c in pairs.columns if c == "cosine_similarity" or re.fullmatch(r"top_\d+_accuracy", str(c))]
    missing = [m for m in metrics if m not in pairs.columns]
    if missing or not metrics:
        raise EvaluationInputError(f"pairs table lacks the metric columns {missing or 'cosine_similarity/top_k_accuracy'}")
    rows = {}
    for group in groups:
        values = pairs.loc[_group_mask(pairs, group), list(metrics)]
        if len(values) == 0:
            raise EvaluationInputError(_empty_group_message(pairs, group))
        row: Dict[str, float] = {"n_pairs": len(values)}
        for metric in metrics:
            column = values[metric].to_numpy(dtype=np.float64)
            row[f"{metric}_mean"] = float(np.mean(column))
            row[f"{metric}_std"] = float(np.std(column))
            row[f"{metric}_median"] = float(np.median(column))
            row[f"{metric}_iqr"] = float(np.quantile(column, 0.75) - np.quantile(column, 0.25))
        rows[group] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "group"
    table["n_pairs"] = table["n_pairs"].astype(int)
    return table


def _empty_group_message(pairs: Any, group: str) -> str:
    stainings = sorted(set(pairs["staining_a"]) | set(pairs["staining_b"]))
    scanners = sorted(set(pairs["scanner_a"]) | set(pairs["scanner_b"]))
    why = {
        "cross-scanner": "no staining was scanned on two scanners",
        "cross-staining": "no scanner scanned two stainings",
        "cross-both": "no two slides differ in both staining and scanner",
        "all": "the table is empty",
    }[group]
    return (
        f"group {group!r} has no slide pairs: {why} (stainings {stainings}, scanners {scanners}); "
        f"leave it out with groups=[...]"
    )


def leaderboard_score(pairs: Any, *, k: int = 10) -> float:
    """The PLISM leaderboard score.

    ``mean(median cosine over all pairs, median top-k cross-scanner, median top-k
    cross-staining, median top-k cross-both)`` with k = 10.

    Args:
        pairs: the DataFrame from ``evaluate_slides`` (needs ``top_{k}_accuracy``).
        k: the top-k column used. Default 10, as on the leaderboard.

    Returns:
        The score, in [0, 1] (H0-mini: 0.541 published).

    Raises:
        EvaluationInputError (a ValueError): a group is empty or the ``top_{k}_accuracy`` column is missing.
    """
    column = f"top_{k}_accuracy"
    if column not in pairs.columns:
        raise EvaluationInputError(f"pairs table has no {column!r} column; run evaluate_slides with k={k} in ks")
    table = aggregate(pairs, metrics=["cosine_similarity", column])
    parts = [
        table.loc["all", "cosine_similarity_median"],
        table.loc["cross-scanner", f"{column}_median"],
        table.loc["cross-staining", f"{column}_median"],
        table.loc["cross-both", f"{column}_median"],
    ]
    return float(np.mean(parts))


__all__ = [
    "TOP_K",
    "GROUPS",
    "PLISM_STAININGS",
    "PLISM_SCANNERS",
    "PLISM_NUM_TILES",
    "SLIDE_PATTERN",
    "SlideFeatures",
    "aggregate",
    "cosine_similarity",
    "evaluate_slides",
    "find_feature_files",
    "leaderboard_score",
    "load_slide_features",
    "metric_names",
    "pair_group",
    "pair_metrics",
    "parse_slide_name",
    "prepare_features",
    "slide_pairs",
    "top_k_accuracy",
]
