"""h0mini.eval: robustness and probing evaluations of tile embeddings (extra ``h0mini[eval]``).

* ``plism``: PLISM stain/scanner robustness metrics (cosine similarity, top-k retrieval) for
  pairs of registered slides, pair groups, aggregates and the leaderboard score, identical to
  plism-benchmark's by default (its float16 arithmetic, tile subset and rounding).
* ``perturb`` and ``report``: a robustness self-check on your own tiles, written as a report
  folder (CSV, Markdown, PNG plots); ``h0mini robustness`` on the command line.
* ``hest``: HEST-Benchmark gene-expression prediction (PCA + ridge + Pearson per gene), scored
  as HEST's code scores it, on task folders as published (``h0mini hest`` on the command line).
* ``probe`` and ``eva``: linear probing with kaiko's eva protocol (eva main by default, the
  unmerged evaluation-protocol-v2 by name; per-dataset settings by eva config name), kNN and logistic-regression baselines, PathoROB's
  robustness index (RI) and de Jong et al.'s ratio.

Everything works on any ``(N, D)`` array, such as ``h0mini.embed_tiles`` or ``h0mini embed``
output. ``import h0mini`` never imports this package; pandas, matplotlib and scikit-learn are
imported only by the functions that need them.
"""

from __future__ import annotations

from .eva import EVA_TASKS, EVA_TRAIN_SIZES, EVA_V2_TASKS, EvaTask, eva_main_patience, eva_task
from .hest import HEST_TASKS, HestWarning, hest_benchmark
from .perturb import PERTURBATIONS, Perturbation, perturb
from .plism import (
    GROUPS,
    PLISM_SCANNERS,
    PLISM_STAININGS,
    SLIDE_PATTERN,
    TOP_K,
    SlideFeatures,
    aggregate,
    cosine_similarity,
    evaluate_slides,
    find_feature_files,
    leaderboard_results,
    leaderboard_score,
    load_slide_features,
    pair_metrics,
    parse_slide_name,
    results_table,
    slide_pairs,
    tile_subset,
    top_k_accuracy,
)
from .probe import (
    QUICK_PROBE,
    ProbeResult,
    RobustnessIndex,
    balanced_accuracy,
    de_jong_ratio,
    knn_probe,
    linear_probe,
    logistic_probe,
    make_split,
    robustness_index,
    run_probes,
)
from .report import RobustnessReport, load_tiles, robustness_report

__all__ = [
    "EVA_TASKS",
    "EVA_TRAIN_SIZES",
    "EVA_V2_TASKS",
    "EvaTask",
    "GROUPS",
    "HEST_TASKS",
    "HestWarning",
    "PERTURBATIONS",
    "PLISM_SCANNERS",
    "PLISM_STAININGS",
    "QUICK_PROBE",
    "SLIDE_PATTERN",
    "TOP_K",
    "Perturbation",
    "ProbeResult",
    "RobustnessIndex",
    "RobustnessReport",
    "SlideFeatures",
    "aggregate",
    "balanced_accuracy",
    "cosine_similarity",
    "evaluate_slides",
    "eva_task",
    "eva_main_patience",
    "de_jong_ratio",
    "find_feature_files",
    "hest_benchmark",
    "knn_probe",
    "leaderboard_results",
    "leaderboard_score",
    "linear_probe",
    "load_slide_features",
    "load_tiles",
    "logistic_probe",
    "make_split",
    "pair_metrics",
    "parse_slide_name",
    "perturb",
    "robustness_index",
    "results_table",
    "robustness_report",
    "run_probes",
    "slide_pairs",
    "tile_subset",
    "top_k_accuracy",
]
