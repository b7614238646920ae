"""An independent transcription of plism-benchmark's arithmetic, for the tests to compare against.

Written for h0mini from reading plism-benchmark (owkin/plism-benchmark, CC BY 4.0); no code is
copied. The tile subsets h0mini ships come from its commit b4f32b7c233e0f5ba8340da89ef65803cfc2ce49
(``assets/``). The code read (the versions the search index holds):

* ``plismbench/engine/evaluate.py`` at 172bd8d3bb3d7ad995f05655268fd42e138f2f2e:
  ``compute_metrics_ab`` (features loaded as float32, the subset rows taken, the pair
  concatenated and cast to float16) and ``core_compute_metrics`` (numpy path: float16 matmul,
  ``np.linalg.norm``, division, mean of the diagonal of the A-B block, ``argpartition`` of the
  negated cosines with kth ``range(1, kmax + 1)``, columns ``1..kmax`` kept, hits per direction
  averaged). ``plismbench/metrics/cosine_similarity.py`` and ``plismbench/metrics/retrieval.py``
  at 1c0d136ff9d83446d9c566ae52bbb30639212718 compute the same way.
* ``plismbench/utils/aggregate.py`` at bc0ef8009d609097821f565673e5f4be9711e333: groups by the
  staining/scanner columns (a same-staining-and-scanner pair is in both inter groups), numpy
  mean/std/median/IQR of each column, rounded to 3 decimals, cells ``"mean (std) ; median (iqr)"``
  of values right-padded with zeros to 5 characters.
* The leaderboard (README, 03/03/2025): the mean of the four medians, rounded to 3 decimals.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def pair_metrics(a: np.ndarray, b: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    """Cosine similarity and top-k accuracies of one slide pair, all in numpy float16."""
    pooled = np.concatenate([np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)]).astype(np.float16)
    n = len(pooled) // 2
    dots = pooled @ pooled.T
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    cosines = dots / (norms * norms.T)
    result = {"cosine_similarity": float(np.diag(cosines[:n, n:]).mean())}
    kmax = max(ks)
    nearest = np.argpartition(-cosines, range(1, kmax + 1), axis=1)[:, 1 : kmax + 1]
    for k in ks:
        rates = []
        for rows, targets in ((slice(0, n), np.arange(n, 2 * n)), (slice(n, 2 * n), np.arange(n))):
            found = (nearest[rows, :k] == targets[:, None]).any(axis=1)
            rates.append(float(found.sum() / n))
        result[f"top_{k}_accuracy"] = sum(rates) / 2
    return result


GROUP_ROWS = ["inter-scanner", "inter-staining", "inter-scanner, inter-staining", "all"]


def _summary(values) -> List[float]:
    q = np.quantile(values, 0.75) - np.quantile(values, 0.25)
    return [float(np.round(x, 3)) for x in (np.mean(values), np.std(values), np.median(values), q)]


def group_rows(pairs) -> Dict[str, np.ndarray]:
    same_staining = (pairs["staining_a"] == pairs["staining_b"]).to_numpy()
    same_scanner = (pairs["scanner_a"] == pairs["scanner_b"]).to_numpy()
    return {
        "inter-scanner": same_staining,
        "inter-staining": same_scanner,
        "inter-scanner, inter-staining": ~same_staining & ~same_scanner,
        "all": np.ones(len(pairs), dtype=bool),
    }


def results(pairs, metrics: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """``{group: {metric: "mean (std) ; median (iqr)"}}``."""
    out: Dict[str, Dict[str, str]] = {}
    for group, rows in group_rows(pairs).items():
        out[group] = {}
        for metric in metrics:
            mean, std, median, iqr = (str(x).ljust(5, "0") for x in _summary(pairs.loc[rows, metric]))
            out[group][metric] = f"{mean} ({std}) ; {median} ({iqr})"
    return out


def leaderboard(pairs, k: int = 10) -> float:
    rows = group_rows(pairs)
    medians = [_summary(pairs.loc[rows["all"], "cosine_similarity"])[2]] + [
        _summary(pairs.loc[rows[g], f"top_{k}_accuracy"])[2] for g in GROUP_ROWS[:3]
    ]
    return float(np.round(np.mean(medians), 3))
