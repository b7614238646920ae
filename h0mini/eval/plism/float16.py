"""plism-benchmark's own float16 arithmetic, reproduced bit for bit on a scalable path.

plism-benchmark (owkin, ``plismbench/engine/evaluate.py``, ``core_compute_metrics``) casts the
pooled ``(2n, d)`` features of a slide pair to float16 and, in numpy, computes the ``2n x 2n``
dot products (numpy's float16 matmul: exact products summed one after the other in a float32
accumulator, rounded once to float16), the float16 row norms (``np.linalg.norm``), the float16
cosines ``dot / (norm * normᵀ)``, the float16 mean of the matched cosines, and each row's
neighbours with ``np.argpartition(-cosine, range(1, kmax + 1))[:, 1:kmax + 1]``: position 0 is
dropped as "the tile itself". Float16 cosines tie often, and ``argpartition`` with those kth is
a selection sort of the first ``kmax + 1`` positions that, among equal values, takes the one
standing first in the row as its swaps have left it; when the matched tile ties with the tile
itself (identical slides), one of the two lands at the dropped position 0.

Building the ``2n x 2n`` float16 matrix costs numpy minutes per pair. Here the same numbers come
from a float32 matrix product and exact bounds: every cosine is bracketed by rigorous error
bounds of the product, the few rows' entries that can reach a row's top ``kmax + 1`` are
recomputed exactly (the same products, summed in the same order in float32, rounded as numpy
rounds), and ``np.argpartition`` itself runs on a shortened row that keeps those entries, and the
row's first ``kmax + 1`` positions, in their order. Rows whose top cannot be bracketed this way
(many near-equal neighbours) fall back to their full row. The result equals plism-benchmark's
CPU (numpy) computation exactly; its GPU path (cupy) sums in another order and can differ in the
last float16 bit. A pair's orientation matters too: with exact float16 ties, ``[A; B]`` and
``[B; A]`` can break ties differently (one ``top_3`` in 200 on coarse test data). h0mini pools
the alphabetically first slide first; plism-benchmark pools the slides in the order its folder
listing returned them, which the file system decides.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, Sequence, Tuple, Union

import numpy as np
import torch

from ...errors import EvaluationInputError
from ..common import resolve_device
from .inputs import ArrayLike, as_matrix, check_finite, zero_row_error

EXTRA_CANDIDATES = 16
"""Approximate neighbours kept per row beyond ``kmax + 1``, from each half of the pooled row."""

PAIRWISE_LIMIT = 256
"""Up to this many candidates per row, brackets are compared pairwise to skip exact recomputation."""

UNIT_ROUNDOFF = 2.0**-24  # float32
HALF_ULP = 2.0**-11  # float16 relative rounding bound


def _gamma(d: int) -> float:
    """Bound on the relative error of a float32 sum of ``d`` terms, in any order (Higham's gamma_d)."""
    return d * UNIT_ROUNDOFF / (1 - d * UNIT_ROUNDOFF)


@dataclass
class HalfFeatures:
    """One slide as the benchmark sees it: float16 features and float16 norms, plus search data."""

    half: np.ndarray  # (n, d) float16, cast as the benchmark casts (to float32 first, then float16)
    rows: torch.Tensor  # (n, d) float32 copy of ``half`` (exact), on the device
    norm: torch.Tensor  # (n,) float32 copy of the float16 norms, on the device
    top_values: torch.Tensor = None  # type: ignore[assignment]  # (n, K) largest approximate within-slide cosines
    top_index: torch.Tensor = None  # type: ignore[assignment]  # (n, K) their columns (the tile itself included)
    bound: torch.Tensor = None  # type: ignore[assignment]  # (n,) no left-out within-slide cosine is above it


def prepare_half(
    features: ArrayLike, *, name: str = "features", device: Union[str, torch.device, None] = None
) -> HalfFeatures:
    """Cast to float16 the benchmark's way and compute its float16 row norms.

    Raises:
        EvaluationInputError (a ValueError): not 2-D, empty, NaN/inf, beyond the float16 range, a
            zero row, or a row whose float16 squared norm overflows (norm above 255.9).
    """
    array = as_matrix(features, name)
    check_finite(array, name, "features")
    with np.errstate(over="ignore"):  # overflow is reported below, naming the tile
        half = np.ascontiguousarray(array.astype(np.float32).astype(np.float16))
    if not np.isfinite(half).all():
        row = int(np.argwhere(~np.isfinite(half))[0][0])
        raise EvaluationInputError(
            f"slide {name!r}: features of tile {row} exceed the float16 range (|x| > 65504) that "
            f"plism-benchmark computes in; pass precision='float32'"
        )
    with np.errstate(over="ignore"):
        norm16 = np.linalg.norm(half, axis=1, keepdims=True)[:, 0]
    if not np.isfinite(norm16).all():
        row = int(np.argwhere(~np.isfinite(norm16))[0][0])
        raise EvaluationInputError(
            f"slide {name!r}: tile {row} has a feature norm above 255.9, whose square overflows the "
            f"float16 arithmetic of plism-benchmark (it would report NaN); pass precision='float32'"
        )
    zero = np.flatnonzero(norm16 == 0)
    if len(zero):
        raise zero_row_error(name, int(zero[0]), len(zero))
    target = resolve_device(device)
    rows = torch.from_numpy(half.astype(np.float32)).to(target)
    norm = torch.from_numpy(norm16.astype(np.float32)).to(target)
    return HalfFeatures(half, rows, norm)


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """float32 matrix products in full float32 (no TF32 or bfloat16 shortcuts): the bounds rely on it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _approx_cosines(rows: torch.Tensor, norm: torch.Tensor, other: HalfFeatures) -> torch.Tensor:
    return (rows @ other.rows.T) / (norm[:, None] * other.norm[None, :])


def within_slide_top(slide: HalfFeatures, kmax: int, chunk_size: int) -> None:
    """Keep each row's largest approximate cosines within its own slide (the tile itself included)."""
    n = slide.rows.shape[0]
    keep = min(n, kmax + 1 + EXTRA_CANDIDATES)
    device = slide.rows.device
    values = torch.empty((n, keep), dtype=torch.float32, device=device)
    index = torch.empty((n, keep), dtype=torch.int64, device=device)
    bound = torch.full((n,), -math.inf, device=device)
    with full_float32_matmul():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            approx = _approx_cosines(slide.rows[start:stop], slide.norm[start:stop], slide)
            top = torch.topk(approx, keep, dim=1)
            values[start:stop], index[start:stop] = top.values, top.indices
            if keep < n:
                bound[start:stop] = top.values[:, -1]
    slide.top_values, slide.top_index, slide.bound = values, index, bound


def sequential_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of float16-exact float32 rows, summed in order in float32.

    This is numpy's float16 matmul before its final rounding: each product of two float16 values
    is exact in float32 (so a fused multiply-add rounds the same), and the sum runs over the
    dimension one term at a time.
    """
    acc = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    xt, yt = x.T.contiguous(), y.T.contiguous()
    for i in range(xt.shape[0]):
        acc.addcmul_(xt[i], yt[i])
    return acc


def half_cosine(dot: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """float16 ``dot / denominator`` as numpy rounds it (float32 arithmetic rounded to float16 is
    correctly rounded for one division of float16 values), returned as float32."""
    return (dot.half().float() / denominator.float()).half().float()


class _Pool:
    """The pooled ``(2n, d)`` features of one pair, in the benchmark's row order (A, then B)."""

    def __init__(self, a: HalfFeatures, b: HalfFeatures):
        self.rows = torch.cat([a.rows, b.rows])
        self.norm = torch.cat([a.norm, b.norm])
        self.n = a.rows.shape[0]
        self.gamma = _gamma(a.rows.shape[1])
        # |exact float16 cosine - approximate cosine| for any entry (see ``_bounds``)
        self.max_error = 3.1 * HALF_ULP + 2.1 * self.gamma + 2.0**-20

    def exact(self, rows: torch.Tensor, cols: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
        """Exact float16 cosines (as float32) of the entries ``(rows[i], cols[i])``."""
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], block):
            r, c = rows[start : start + block], cols[start : start + block]
            dot = sequential_dot(self.rows[r], self.rows[c])
            denominator = (self.norm[r] * self.norm[c]).half()
            out[start : start + block] = half_cosine(dot, denominator)
        if not torch.isfinite(out).all():
            raise EvaluationInputError(
                "a float16 dot product of two tiles overflows (|x·y| > 65504) in plism-benchmark's float16 "
                "arithmetic, which would report NaN; pass precision='float32'"
            )
        return out

    def bounds(self, rows: torch.Tensor, cols: torch.Tensor, approx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds of the exact float16 cosines from approximate ones.

        ``approx * n_r n_c`` is within ``E = (2.1 gamma_d + 8 u) n_r n_c`` of numpy's float32 sum
        (both sums are within ``gamma_d |x||y|`` of the exact one, and ``|x||y| <= 1.0023 n_r n_c``
        for float16 norms), and the rounding that follows is monotone, so the exact cosine lies
        between the roundings of ``S - E`` and ``S + E``.
        """
        scale = self.norm[rows] * self.norm[cols]
        product = approx * scale
        margin = (2.1 * self.gamma + 8 * UNIT_ROUNDOFF) * scale
        denominator = scale.half()
        return half_cosine(product - margin, denominator), half_cosine(product + margin, denominator)


def _select(
    pool: _Pool, rows: torch.Tensor, cols: torch.Tensor, approx: torch.Tensor, kmax: int
) -> Tuple[torch.Tensor, np.ndarray]:
    """Run ``np.argpartition`` on shortened rows holding every entry that can reach the top.

    Args:
        rows: ``(R,)`` pooled row indices.
        cols: ``(R, W)`` distinct pooled column candidates per row; every left-out entry must be
            below the row's (kmax+1)-th largest exact cosine.
        approx: ``(R, W)`` their approximate cosines.

    Returns:
        ``(L, positions)``: the lower bound of each row's (kmax+1)-th largest cosine, and the pooled
        columns that ``argpartition`` puts at positions ``1..kmax``, ``(R, kmax)``.
    """
    count, width = cols.shape
    row_of = rows[:, None].expand(count, width)
    low, high = pool.bounds(row_of, cols, approx)
    threshold = torch.topk(low, kmax + 1, dim=1).values[:, -1]
    reach = high >= threshold[:, None]
    # Only the order of the entries that can reach the top matters to argpartition. An entry whose
    # bracket meets no other's keeps its place with its lower bound; the others get exact values.
    values = torch.where(reach, low, torch.full_like(low, -math.inf))
    if width <= PAIRWISE_LIMIT:
        meets = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None]) & reach[:, None, :]
        meets &= ~torch.eye(width, dtype=torch.bool, device=cols.device)
        unsure = reach & meets.any(dim=2)
    else:
        unsure = reach & (low != high)
    if unsure.any():
        values[unsure] = pool.exact(row_of[unsure], cols[unsure])
    # the first kmax + 1 positions of the full row, then the other entries that can reach the top, in row order
    head = torch.full((count, kmax + 1), -math.inf, device=cols.device)
    at = torch.nonzero(reach & (cols <= kmax))
    head[at[:, 0], cols[at[:, 0], at[:, 1]]] = values[at[:, 0], at[:, 1]]
    order_key = torch.where(reach & (cols > kmax), cols, torch.full_like(cols, 1 << 62))
    order = torch.argsort(order_key, dim=1)
    tail_values = torch.where(
        torch.gather(order_key, 1, order) < (1 << 62), torch.gather(values, 1, order), torch.full_like(values, -math.inf)
    )
    short_values = torch.cat([head, tail_values], dim=1)
    short_cols = torch.cat([torch.arange(kmax + 1, device=cols.device).expand(count, kmax + 1), torch.gather(cols, 1, order)], dim=1)
    negated = -(short_values.cpu().numpy().astype(np.float16))
    picked = np.argpartition(negated, range(1, kmax + 1), axis=1)[:, 1 : kmax + 1]
    return threshold, np.take_along_axis(short_cols.cpu().numpy(), picked, axis=1)


def _neighbours(
    pool: _Pool, query: HalfFeatures, other: HalfFeatures, query_offset: int, other_offset: int, kmax: int, chunk_size: int
) -> np.ndarray:
    """For each row of ``query``: the pooled columns at argpartition positions ``1..kmax``."""
    n = pool.n
    keep = min(n, kmax + 1 + EXTRA_CANDIDATES)
    out = np.empty((n, kmax), dtype=np.int64)
    device = query.rows.device
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        approx_other = _approx_cosines(query.rows[start:stop], query.norm[start:stop], other)
        top = torch.topk(approx_other, keep, dim=1)
        left_out = torch.maximum(query.bound[start:stop], top.values[:, -1] if keep < n else torch.full((stop - start,), -math.inf, device=device))
        cols = torch.cat([query.top_index[start:stop] + query_offset, top.indices + other_offset], dim=1)
        approx = torch.cat([query.top_values[start:stop], top.values], dim=1)
        rows = torch.arange(start, stop, device=device) + query_offset
        threshold, picked = _select(pool, rows, cols, approx, kmax)
        out[start:stop] = picked
        incomplete = torch.nonzero(left_out + pool.max_error >= threshold)[:, 0]
        if len(incomplete):  # too many near-equal neighbours: use the whole row
            local = incomplete + start
            full_cols = torch.arange(2 * n, device=device).expand(len(local), 2 * n)
            own = _approx_cosines(query.rows[local], query.norm[local], query)
            full_approx = torch.empty((len(local), 2 * n), device=device)
            full_approx[:, query_offset : query_offset + n] = own
            full_approx[:, other_offset : other_offset + n] = approx_other[incomplete]
            out[local.cpu().numpy()] = _select(pool, local + query_offset, full_cols, full_approx, kmax)[1]
    return out


def matched_cosines(a: HalfFeatures, b: HalfFeatures) -> np.ndarray:
    """The float16 cosines of tile ``i`` of A and tile ``i`` of B, exactly as the benchmark's matrix holds them."""
    n = a.rows.shape[0]
    index = torch.arange(n, device=a.rows.device)
    with torch.inference_mode():
        return _Pool(a, b).exact(index, index + n).cpu().numpy().astype(np.float16)


def pair_metrics_half(a: HalfFeatures, b: HalfFeatures, ks: Sequence[int], chunk_size: int) -> Dict[str, float]:
    """Cosine similarity and top-k accuracies exactly as plism-benchmark computes them (numpy, CPU)."""
    n = a.rows.shape[0]
    kmax = max(ks)
    pool = _Pool(a, b)
    matched = matched_cosines(a, b)
    with torch.inference_mode(), full_float32_matmul():
        from_a = _neighbours(pool, a, b, 0, n, kmax, chunk_size)
        from_b = _neighbours(pool, b, a, n, 0, kmax, chunk_size)
    out = {"cosine_similarity": float(np.mean(matched))}  # float16 mean, as numpy takes it
    match_of_a, match_of_b = np.arange(n, 2 * n)[:, None], np.arange(n)[:, None]
    for k in ks:
        hits_a = np.sum(np.any(from_a[:, :k] == match_of_a, axis=1)) / n
        hits_b = np.sum(np.any(from_b[:, :k] == match_of_b, axis=1)) / n
        out[f"top_{k}_accuracy"] = (float(hits_a) + float(hits_b)) / 2
    return out


__all__ = ["HalfFeatures", "matched_cosines", "pair_metrics_half", "prepare_half", "sequential_dot", "within_slide_top"]
