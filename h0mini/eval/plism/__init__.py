"""PLISM robustness metrics, as the public plism-benchmark (owkin) computes them.

PLISM holds 91 registered slides of the same tissue: 13 H&E stainings x 7 scanners, so tile
``i`` shows the same cells in every slide. A stain- and scanner-robust model gives tile ``i``
nearly the same embedding in every slide. For each pair of slides (A, B), with matched
``(n, d)`` features:

* **cosine similarity**: ``mean_i cos(A_i, B_i)``.
* **top-k accuracy** (k = 1, 3, 5, 10): pool the ``2n`` rows of A and B; for each row, rank the
  pooled rows by cosine similarity. ``A_i`` hits when ``B_i`` is among its k nearest, and
  symmetrically for ``B_i``; the accuracy is the mean of the two directions' hit rates.

The 4,095 slide pairs fall into groups read from the slide names (``<staining>_<scanner>``), and
the leaderboard score averages four group medians (``aggregate``).

By default (``precision="float16"``) every number is plism-benchmark's own, to the last bit:
its float16 arithmetic, its neighbour selection (``argpartition``, position 0 dropped as the
tile itself), its 8,139-tile subset and its rounding (``float16``, ``subsets``, ``aggregate``).
``precision="float32"`` computes in float32 from the unrounded features instead (``float32``).

Modules: ``names`` (constants, slide names, groups), ``files`` (reading features), ``registration``
(same tiles in every slide), ``float16`` and ``float32`` (the two arithmetics), ``pairs`` (one
pair), ``runner`` (``evaluate_slides``), ``subsets`` (the tile subsets), ``aggregate``.
"""

from __future__ import annotations

from .aggregate import aggregate, leaderboard_results, leaderboard_score, results_table
from .files import FEATURE_SUFFIXES, PLISMBENCH_COORDS_COLUMNS, SlideFeatures, find_feature_files, load_slide_features
from .names import (
    GROUPS,
    PLISM_NUM_TILES,
    PLISM_SCANNERS,
    PLISM_STAININGS,
    PLISM_TILES_PER_SLIDE,
    SLIDE_PATTERN,
    TOP_K,
    metric_names,
    pair_group,
    parse_slide_name,
    slide_pairs,
)
from .pairs import cosine_similarity, pair_metrics, top_k_accuracy
from .runner import evaluate_slides
from .subsets import SUBSET_SIZES, tile_subset

__all__ = [
    "FEATURE_SUFFIXES",
    "GROUPS",
    "PLISMBENCH_COORDS_COLUMNS",
    "PLISM_NUM_TILES",
    "PLISM_SCANNERS",
    "PLISM_STAININGS",
    "PLISM_TILES_PER_SLIDE",
    "SLIDE_PATTERN",
    "SUBSET_SIZES",
    "TOP_K",
    "SlideFeatures",
    "aggregate",
    "cosine_similarity",
    "evaluate_slides",
    "find_feature_files",
    "leaderboard_results",
    "leaderboard_score",
    "load_slide_features",
    "metric_names",
    "pair_group",
    "pair_metrics",
    "parse_slide_name",
    "results_table",
    "slide_pairs",
    "tile_subset",
    "top_k_accuracy",
]
