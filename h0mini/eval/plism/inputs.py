"""Checks of feature arrays and arguments shared by both arithmetics of the PLISM metrics."""

from __future__ import annotations

from typing import Iterable, Sequence, Tuple, Union

import numpy as np
import torch

from ...errors import EvaluationInputError

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]

PRECISIONS = ("float16", "float32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EvaluationInputError(
            f"precision must be 'float16' (plism-benchmark's own arithmetic) or 'float32', got {precision!r}"
        )
    return precision


def check_ks(ks: Iterable[int], n: int) -> Tuple[int, ...]:
    """The k of the top-k accuracies, each in ``[1, 2n - 1]``."""
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


def as_matrix(x: ArrayLike, name: str, field: str = "features") -> np.ndarray:
    """A non-empty real 2-D numpy array (bfloat16 tensors become float32)."""
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


def check_finite(array: np.ndarray, name: str, what: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        count = int((~finite.all(axis=1)).sum())
        raise EvaluationInputError(
            f"slide {name!r}: {what} has non-finite values (NaN or inf) in {count} tile(s), "
            f"first at tile {row}, dimension {col} ({array[row, col]})"
        )


def check_same_shape(shape_a: Sequence[int], shape_b: Sequence[int], names: Tuple[str, str]) -> None:
    if shape_a[0] != shape_b[0]:
        raise EvaluationInputError(
            f"slide {names[1]!r} has {shape_b[0]} tiles but slide {names[0]!r} has {shape_a[0]}: "
            f"PLISM metrics compare matched tiles, so every slide needs the same tiles in the same order"
        )
    if shape_a[1] != shape_b[1]:
        raise EvaluationInputError(
            f"slide {names[1]!r} has {shape_b[1]}-d features but slide {names[0]!r} has {shape_a[1]}-d"
        )


def zero_row_error(name: str, row: int, count: int) -> EvaluationInputError:
    return EvaluationInputError(
        f"slide {name!r}: tile {row} has an all-zero feature vector; its cosine similarity is undefined "
        f"({count} such tile(s))"
    )


__all__ = ["ArrayLike", "PRECISIONS", "as_matrix", "check_finite", "check_ks", "check_precision", "check_same_shape"]
