"""The PLISM metrics in float32 arithmetic: more accurate than the benchmark's float16, and scalable.

Nothing of size ``2n x 2n`` is ever built. Each slide's within-slide neighbours (the ``A·Aᵀ``
block, needed for every pair the slide is in) are reduced once to the largest similarities per
row; each pair then needs one ``n x n`` product, computed in blocks of ``chunk_size`` rows.

Ranking rule: a hit means fewer than ``k`` other rows are *strictly* more similar than the
matched one, and a tile whose features are bit-identical to the matched tile's is a tie that the
matched tile wins (duplicated tiles give equal similarities in exact arithmetic, but a matrix
product may round them one ulp apart).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch

from ...errors import EvaluationInputError
from ..common import resolve_device
from .inputs import ArrayLike, as_matrix, check_finite, zero_row_error


@dataclass
class UnitFeatures:
    """One slide's L2-normalised float32 rows, and which rows are bit-identical (``group`` ids)."""

    unit: torch.Tensor  # (n, d) float32, unit rows, on the device
    key: np.ndarray  # (n,) int64 digest of each row's bytes: equal for bit-identical rows, in any slide
    top_values: torch.Tensor = None  # type: ignore[assignment]  # (n, m) largest within-slide similarities
    top_index: torch.Tensor = None  # type: ignore[assignment]  # (n, m) their columns


def row_keys(array: np.ndarray) -> np.ndarray:
    """A 64-bit digest per row, equal for bit-identical rows (-0.0 and 0.0 differ, as bytes do)."""
    contiguous = np.ascontiguousarray(array)
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in contiguous)
    return np.frombuffer(digests, dtype=np.int64).copy()


def prepare_features(
    features: ArrayLike,
    *,
    name: str = "features",
    device: Union[str, torch.device, None] = None,
) -> UnitFeatures:
    """L2-normalise the rows in float32 and label bit-identical rows.

    Args:
        features: ``(n, d)`` features of one slide.
        name: the slide's name, used in error messages.
        device: torch device of the result, or ``"auto"``. Default: CPU.

    Returns:
        ``UnitFeatures`` with unit rows on ``device``.

    Raises:
        EvaluationInputError (a ValueError): not 2-D, empty, NaN/inf (naming the tile), or a zero row.
    """
    array = as_matrix(features, name)
    check_finite(array, name, "features")
    array = np.ascontiguousarray(array, dtype=np.float32)
    tensor = torch.from_numpy(array).to(resolve_device(device))
    norms = torch.linalg.vector_norm(tensor, dim=1, keepdim=True)
    zero = (norms[:, 0] == 0).nonzero()
    if len(zero):
        raise zero_row_error(name, int(zero[0, 0]), len(zero))
    return UnitFeatures(tensor / norms, row_keys(array))


def within_slide_top(slide: UnitFeatures, kmax: int, chunk_size: int) -> None:
    """Keep each row's largest similarities to the *other* rows of its slide.

    Enough are kept that ``kmax`` remain after removing the rows that a duplicated tile makes
    ties (at most the largest number of copies of one row).
    """
    unit = slide.unit
    n = unit.shape[0]
    copies = int(np.bincount(np.unique(slide.key, return_inverse=True)[1]).max())
    keep = min(kmax + copies, n - 1)
    values = torch.empty((n, keep), dtype=unit.dtype, device=unit.device)
    index = torch.empty((n, keep), dtype=torch.int64, device=unit.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start, device=unit.device)
        block[rows, rows + start] = -math.inf
        if keep:
            top = torch.topk(block, keep, dim=1, sorted=False)
            values[start:stop], index[start:stop] = top.values, top.indices
    slide.top_values, slide.top_index = values, index


def pair_ranks(a: UnitFeatures, b: UnitFeatures, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matched cosines and, per direction, how many other pooled rows beat the matched one.

    A competitor whose features are bit-identical to the matched tile's never beats it.
    """
    unit_a, unit_b = a.unit, b.unit
    device = unit_a.device
    n = unit_a.shape[0]
    key_a = torch.from_numpy(a.key).to(device)
    key_b = torch.from_numpy(b.key).to(device)
    matched = (unit_a * unit_b).sum(dim=1)
    # within-slide competitors of A_i against target B_i, and of B_i against target A_i
    rank_a = torch.count_nonzero((a.top_values > matched[:, None]) & (key_a[a.top_index] != key_b[:, None]), dim=1)
    rank_b = torch.count_nonzero((b.top_values > matched[:, None]) & (key_b[b.top_index] != key_a[:, None]), dim=1)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = unit_a[start:stop] @ unit_b.T  # rows: tiles of A; columns: tiles of B
        rows = torch.arange(stop - start, device=device)
        block[rows, rows + start] = -math.inf  # the matched tile is the target, not a competitor
        # A_i's competitors B_j tie with target B_i when B_j == B_i; B_j's competitors A_i when A_i == A_j
        tie_b = key_b[None, :] == key_b[start:stop, None]
        tie_a = key_a[start:stop, None] == key_a[None, :]
        rank_a[start:stop] += torch.count_nonzero((block > matched[start:stop, None]) & ~tie_b, dim=1)
        rank_b += torch.count_nonzero((block > matched[None, :]) & ~tie_a, dim=0)
    return matched, rank_a, rank_b


def metrics_from_ranks(
    matched: torch.Tensor, rank_a: torch.Tensor, rank_b: torch.Tensor, ks: Sequence[int]
) -> Dict[str, float]:
    out = {"cosine_similarity": float(matched.double().mean())}
    for k in ks:
        hits_a = (rank_a < k).double().mean()
        hits_b = (rank_b < k).double().mean()
        out[f"top_{k}_accuracy"] = float((hits_a + hits_b) / 2)
    return out


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 1:
        raise EvaluationInputError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


__all__ = ["UnitFeatures", "metrics_from_ranks", "pair_ranks", "prepare_features", "within_slide_top"]
