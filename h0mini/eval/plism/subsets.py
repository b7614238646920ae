"""plism-benchmark's tile subsets, shipped with h0mini (CC BY 4.0, see ``data/ATTRIBUTION.md``).

The leaderboard is computed on 8,139 of the 16,278 tiles of each PLISM slide, in the order of
plism-benchmark's ``assets/tiles_subset_8139.npy``; 460, 2,713 and 5,426 are its smaller subsets.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import EvaluationInputError
from .names import PLISM_NUM_TILES, PLISM_TILES_PER_SLIDE

SUBSET_SIZES: Tuple[int, ...] = (460, 2_713, 5_426, 8_139)
"""Sizes of plism-benchmark's tile subsets."""

TilesArg = Union[None, str, int, Sequence[int], np.ndarray]


@lru_cache(maxsize=None)
def _load(size: int) -> np.ndarray:
    with resources.files(__package__).joinpath("data", f"tiles_subset_{size}.npy").open("rb") as f:
        indices = np.load(f, allow_pickle=False)
    indices.setflags(write=False)
    return indices


def tile_subset(size: int = PLISM_NUM_TILES) -> np.ndarray:
    """plism-benchmark's subset of ``size`` tile indices (into the 16,278 tiles of a PLISM slide).

    Args:
        size: 460, 2713, 5426 or 8139 (the leaderboard's), or 16278 for every tile.

    Returns:
        A read-only int64 array of distinct indices, in plism-benchmark's order (not sorted: the
        order decides which of two exactly tied neighbours its ``argpartition`` ranks first).

    Raises:
        EvaluationInputError (a ValueError): another size.
    """
    if size == PLISM_TILES_PER_SLIDE:
        return np.arange(PLISM_TILES_PER_SLIDE)
    if size not in SUBSET_SIZES:
        raise EvaluationInputError(
            f"plism-benchmark has tile subsets of {', '.join(map(str, SUBSET_SIZES))} or all {PLISM_TILES_PER_SLIDE} "
            f"tiles, not {size}; pass an index array for another subset"
        )
    return _load(size)


def resolve_tiles(tiles: Any, n_tiles: int) -> Optional[np.ndarray]:
    """Which rows of each slide to use.

    ``"default"``: plism-benchmark's 8,139-tile subset when slides have the 16,278 PLISM tiles,
    else every tile. ``None`` or ``"all"``: every tile. An int: that subset size. An array:
    those rows, in that order.
    """
    if isinstance(tiles, str):
        if tiles == "all":
            return None
        if tiles == "default":
            return tile_subset(PLISM_NUM_TILES) if n_tiles == PLISM_TILES_PER_SLIDE else None
        raise EvaluationInputError(f"tiles must be 'all', 'default', a subset size or an index array, got {tiles!r}")
    if tiles is None:
        return None
    if isinstance(tiles, (int, np.integer)):
        if n_tiles != PLISM_TILES_PER_SLIDE:
            raise EvaluationInputError(
                f"tiles={int(tiles)} picks one of plism-benchmark's subsets of the {PLISM_TILES_PER_SLIDE} tiles of a "
                f"PLISM slide, but the slides have {n_tiles} tiles; pass tiles='all' or an index array"
            )
        return tile_subset(int(tiles))
    indices = np.asarray(tiles)
    if indices.ndim != 1 or len(indices) == 0 or not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0:
        raise EvaluationInputError("tiles as an array must be a non-empty 1-D sequence of non-negative integers")
    if indices.max() >= n_tiles:
        raise EvaluationInputError(f"tiles asks for tile {int(indices.max())}, but the slides have {n_tiles} tiles")
    if len(np.unique(indices)) != len(indices):
        raise EvaluationInputError("tiles has repeated indices; each tile can be used once")
    return indices.astype(np.int64)


__all__ = ["SUBSET_SIZES", "resolve_tiles", "tile_subset"]
