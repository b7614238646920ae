"""``evaluate_slides``: the PLISM metrics of every pair of slides, from a folder or a mapping."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...errors import EvaluationInputError
from ..common import progress_bar, resolve_device
from . import float16, float32
from .files import PathLike, find_feature_files
from .inputs import check_ks, check_precision
from .pairs import warn_if_identical
from .names import SLIDE_PATTERN, TOP_K, metric_names, slide_pairs
from .registration import SlideStore
from .subsets import TilesArg, resolve_tiles


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
    tiles: TilesArg = "default",
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
        precision: ``"float16"`` (default): plism-benchmark's own float16 arithmetic, identical to
            its numbers (see ``h0mini.eval.plism.float16``); ``"float32"``: float32 arithmetic on
            the unrounded features, more accurate but not the leaderboard's.
        chunk_size: rows per similarity block.
        device: torch device for the matrix products. Default ``"auto"``: CUDA when available, else CPU.
        tiles: which tiles of every slide to use. ``"default"``: plism-benchmark's 8,139-tile subset
            (the leaderboard's) when slides have PLISM's 16,278 tiles, else all tiles. ``None`` or
            ``"all"``: every tile. 460, 2713, 5426 or 8139: that plism-benchmark subset. An index
            array: those rows, in that order.
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
    check_precision(precision)
    if coords_columns is not None and coords_columns < 0:
        raise EvaluationInputError(f"coords_columns must be >= 0, got {coords_columns}")
    torch_device = resolve_device(device)
    ks = check_ks(ks, sys.maxsize)  # k >= 1 now; k <= 2n - 1 once the tile count is known
    store = SlideStore(
        sources,
        precision=precision,
        device=torch_device,
        kmax=max(ks),
        chunk_size=chunk_size,
        tile_indices=None,
        coords_columns=coords_columns,
        check_coords=check_coords,
        capacity=max_slides_in_memory,
    )
    store.tile_indices = resolve_tiles(tiles, store.tile_count(names[0]))
    first = store.get(names[0])
    n_tiles = (first.half if precision == "float16" else first.unit).shape[0]
    ks = check_ks(ks, n_tiles)
    block = len(names) if max_slides_in_memory is None else max(1, max_slides_in_memory // 2)
    order = {pair: i for i, pair in enumerate(zip(pairs["slide_a"], pairs["slide_b"]))}
    results: List[Optional[Dict[str, float]]] = [None] * len(order)
    bar = progress_bar(progress, total=len(order), unit="pair", desc="PLISM pairs")
    try:
        with torch.inference_mode():
            for a, b in _blocked_pairs(names, block):
                slide_a, slide_b = store.get(a), store.get(b)
                if precision == "float16":
                    warn_if_identical(slide_a.half, slide_b.half, (a, b), stacklevel=2)
                    metrics = float16.pair_metrics_half(slide_a, slide_b, ks, chunk_size)
                else:
                    metrics = float32.metrics_from_ranks(*float32.pair_ranks(slide_a, slide_b, chunk_size), ks)
                results[order[(a, b)]] = metrics
                bar.update(1)
    finally:
        bar.close()
    for name in metric_names(ks):
        pairs[name] = [r[name] for r in results]  # type: ignore[index]
    return pairs


__all__ = ["evaluate_slides"]
