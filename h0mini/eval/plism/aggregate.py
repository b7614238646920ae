"""Per-group summaries of the pair metrics, the leaderboard score, and plism-benchmark's own tables.

As plism-benchmark (``plismbench/utils/aggregate.py``): *cross-scanner* is every pair with the
same staining, *cross-staining* every pair with the same scanner, *cross-both* the pairs that
differ in both; each group gets the mean, the population std, the median and the IQR
(``quantile(0.75) - quantile(0.25)``, linear) of each metric, rounded to 3 decimals. The
leaderboard score is the mean of the median cosine over all pairs and the median top-10
accuracy of the three cross groups, rounded to 3 decimals again.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ...errors import EvaluationInputError
from ..common import import_optional
from .names import GROUPS, UPSTREAM_GROUP_NAMES

STATISTICS = ("mean", "std", "median", "iqr")

LEADERBOARD_DECIMALS = 3
"""plism-benchmark rounds its aggregates, and the leaderboard score, to 3 decimals."""


def group_mask(pairs: Any, group: str) -> np.ndarray:
    """Which rows of a pair table belong to ``group`` (a replicate pair is in both cross-scanner and cross-staining)."""
    same_staining = (pairs["staining_a"] == pairs["staining_b"]).to_numpy()
    same_scanner = (pairs["scanner_a"] == pairs["scanner_b"]).to_numpy()
    masks = {
        "cross-scanner": same_staining,
        "cross-staining": same_scanner,
        "cross-both": ~same_staining & ~same_scanner,
        "all": np.ones(len(pairs), dtype=bool),
    }
    if group not in masks:
        raise EvaluationInputError(f"unknown group {group!r}; choose from {GROUPS}")
    return masks[group]


def _statistics(column: Any) -> Dict[str, float]:
    """The four statistics by the calls plism-benchmark makes (numpy on a pandas column)."""
    return {
        "mean": float(np.mean(column)),
        "std": float(np.std(column)),
        "median": float(np.median(column)),
        "iqr": float(np.quantile(column, 0.75) - np.quantile(column, 0.25)),
    }


def aggregate(
    pairs: Any,
    *,
    groups: Sequence[str] = GROUPS,
    metrics: Optional[Sequence[str]] = None,
    decimals: Optional[int] = LEADERBOARD_DECIMALS,
) -> Any:
    """Mean, std, median and IQR of each metric per pair group, as plism-benchmark reports them.

    Args:
        pairs: the DataFrame from ``evaluate_slides``.
        groups: which groups to summarise.
        metrics: metric columns. Default: ``cosine_similarity`` and every ``top_*_accuracy``.
        decimals: round every statistic to this many decimals (plism-benchmark: 3); ``None``
            keeps full precision.

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
        values = pairs.loc[group_mask(pairs, group), list(metrics)]
        if len(values) == 0:
            raise EvaluationInputError(_empty_group_message(pairs, group))
        row: Dict[str, float] = {"n_pairs": len(values)}
        for metric in metrics:
            for stat, value in _statistics(values[metric].astype(np.float64)).items():
                row[f"{metric}_{stat}"] = value if decimals is None else float(np.round(value, decimals))
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


def _leaderboard_parts(pairs: Any, k: int, decimals: Optional[int]) -> Dict[str, float]:
    column = f"top_{k}_accuracy"
    if column not in pairs.columns:
        raise EvaluationInputError(f"pairs table has no {column!r} column; run evaluate_slides with k={k} in ks")
    table = aggregate(pairs, metrics=["cosine_similarity", column], decimals=decimals)
    return {
        "Cosine similarity (all)": float(table.loc["all", "cosine_similarity_median"]),
        f"Top-{k} accuracy (cross-scanner)": float(table.loc["cross-scanner", f"{column}_median"]),
        f"Top-{k} accuracy (cross-staining)": float(table.loc["cross-staining", f"{column}_median"]),
        f"Top-{k} accuracy (cross-scanner, cross-staining)": float(table.loc["cross-both", f"{column}_median"]),
    }


def leaderboard_score(pairs: Any, *, k: int = 10, decimals: Optional[int] = LEADERBOARD_DECIMALS) -> float:
    """The PLISM leaderboard score.

    ``mean(median cosine over all pairs, median top-k cross-scanner, median top-k
    cross-staining, median top-k cross-both)`` with k = 10, from medians rounded to ``decimals``
    and rounded again, as plism-benchmark's leaderboard.

    Args:
        pairs: the DataFrame from ``evaluate_slides`` (needs ``top_{k}_accuracy``).
        k: the top-k column used. Default 10, as on the leaderboard.
        decimals: 3 as published; ``None`` for the unrounded score.

    Returns:
        The score, in [0, 1] (H0-mini: 0.541 published).

    Raises:
        EvaluationInputError (a ValueError): a group is empty or the ``top_{k}_accuracy`` column is missing.
    """
    score = float(np.mean(list(_leaderboard_parts(pairs, k, decimals).values())))
    return score if decimals is None else float(np.round(score, decimals))


def leaderboard_results(pairs: Any, *, k: int = 10) -> Dict[str, float]:
    """The leaderboard row of plism-benchmark's README for these pairs, ready to paste into a PR.

    Upstream builds its leaderboard with ``plismbench.utils.metrics.get_leaderboard_results(
    metrics_root_dir)`` (README and ``notebooks/visualization.ipynb`` at 348704e6): a DataFrame
    with one row per extractor folder, printed with ``to_markdown(floatfmt=".3f")``. That
    function's code is not in the stored versions of plism-benchmark, so the keys here are the
    column names of the README leaderboard table at that commit ("Extractor" and "Rank" left out),
    and the values follow the README's definition of the metric; neither is checked against the
    function itself.

    Returns:
        ``{"Cosine similarity (all)": ..., "Top-10 accuracy (cross-scanner)": ...,
        "Top-10 accuracy (cross-staining)": ..., "Top-10 accuracy (cross-scanner, cross-staining)":
        ..., "Leaderboard metric": ...}``, each rounded to 3 decimals.
    """
    parts = _leaderboard_parts(pairs, k, LEADERBOARD_DECIMALS)
    parts["Leaderboard metric"] = float(np.round(np.mean(list(parts.values())), LEADERBOARD_DECIMALS))
    return parts


def _padded(value: float) -> str:
    """plism-benchmark's cell text: ``str`` of the rounded value, right-padded with zeros to 5 characters."""
    return str(value).ljust(5, "0")


def results_table(pairs: Any, *, metrics: Optional[Sequence[str]] = None) -> Any:
    """plism-benchmark's ``results.csv`` table: ``"mean (std) ; median (iqr)"`` per group and metric.

    Rows are named as upstream (``inter-scanner``, ``inter-staining``, ``inter-scanner,
    inter-staining``, ``all``), so the table can be pasted into a plism-benchmark PR as is
    (``table.to_markdown()``).

    Returns:
        A DataFrame of strings.
    """
    pd = import_optional("pandas", "PLISM results table")
    table = aggregate(pairs, metrics=metrics, decimals=LEADERBOARD_DECIMALS)
    names = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    cells = {
        UPSTREAM_GROUP_NAMES[group]: {
            name: f"{_padded(row[name + '_mean'])} ({_padded(row[name + '_std'])}) ; "
            f"{_padded(row[name + '_median'])} ({_padded(row[name + '_iqr'])})"
            for name in names
        }
        for group, row in table.iterrows()
    }
    return pd.DataFrame.from_dict(cells, orient="index")


__all__ = ["aggregate", "group_mask", "leaderboard_results", "leaderboard_score", "results_table"]
