"""The PLISM metrics of one pair of slides, in either arithmetic."""

from __future__ import annotations

import warnings
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch

from . import float16, float32
from .inputs import ArrayLike, check_ks, check_precision, check_same_shape
from .names import TOP_K


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
        precision: ``"float16"`` (default): plism-benchmark's own float16 arithmetic, identical to
            its numbers; ``"float32"``: float32 arithmetic on the unrounded features (more
            accurate; a tie with a tile identical to the matched one goes to the matched one).
        chunk_size: rows per similarity block (memory ``~3 * chunk_size * n * 4`` bytes).
        device: torch device for the matrix products (``"cuda"``, or ``"auto"`` for CUDA when
            available). Default: CPU.
        names: names of the two slides in error messages.

    Returns:
        ``{"cosine_similarity": ..., "top_1_accuracy": ..., ...}`` as Python floats.

    Raises:
        EvaluationInputError (a ValueError): shapes differ, non-finite or zero features, features
            beyond float16's range in float16 mode, or a k out of range.

    Example:
        >>> pair_metrics([[0, 1], [1, 0], [1, 1], [1, 1]], [[0, 2], [2, 0], [-1, -1], [0, 1]], ks=(1,))
        {'cosine_similarity': 0.4267..., 'top_1_accuracy': ...}
    """
    check_precision(precision)
    float32.check_chunk_size(chunk_size)
    if precision == "float16":
        first = float16.prepare_half(a, name=names[0], device=device)
        second = float16.prepare_half(b, name=names[1], device=device)
        check_same_shape(first.half.shape, second.half.shape, names)
        warn_if_identical(first.half, second.half, names)
        ks = check_ks(ks, first.half.shape[0])
        for slide in (first, second):
            float16.within_slide_top(slide, max(ks), chunk_size)
        return float16.pair_metrics_half(first, second, ks, chunk_size)
    unit_a = float32.prepare_features(a, name=names[0], device=device)
    unit_b = float32.prepare_features(b, name=names[1], device=device)
    check_same_shape(unit_a.unit.shape, unit_b.unit.shape, names)
    ks = check_ks(ks, unit_a.unit.shape[0])
    with torch.inference_mode():
        for slide in (unit_a, unit_b):
            float32.within_slide_top(slide, max(ks), chunk_size)
        return float32.metrics_from_ranks(*float32.pair_ranks(unit_a, unit_b, chunk_size), ks)


def warn_if_identical(a: "np.ndarray", b: "np.ndarray", names: Tuple[str, str], stacklevel: int = 3) -> None:
    """float16 mode: two slides with identical features score about 0.5 top-1, by plism-benchmark's own ties."""
    if a.shape == b.shape and np.array_equal(a, b):
        warnings.warn(
            f"slides {names[0]!r} and {names[1]!r} have identical float16 features: in plism-benchmark's float16 "
            "arithmetic (the default, kept for leaderboard numbers) each tile ties with its own copy and the "
            "benchmark drops one of the two, so top-1 accuracy comes out near 0.5, not 1. Pass "
            "precision='float32' (float32 arithmetic; a tie goes to the matched tile) to score identical slides as 1",
            UserWarning,
            stacklevel=stacklevel,
        )


def cosine_similarity(a: ArrayLike, b: ArrayLike, *, precision: str = "float16") -> float:
    """Mean cosine similarity of matched rows, ``mean_i cos(a_i, b_i)`` (see ``pair_metrics``)."""
    check_precision(precision)
    if precision == "float16":
        first, second = float16.prepare_half(a, name="a"), float16.prepare_half(b, name="b")
        check_same_shape(first.half.shape, second.half.shape, ("a", "b"))
        return float(np.mean(float16.matched_cosines(first, second)))
    unit_a, unit_b = float32.prepare_features(a, name="a"), float32.prepare_features(b, name="b")
    check_same_shape(unit_a.unit.shape, unit_b.unit.shape, ("a", "b"))
    return float((unit_a.unit * unit_b.unit).sum(dim=1).double().mean())


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


__all__ = ["cosine_similarity", "pair_metrics", "top_k_accuracy"]
