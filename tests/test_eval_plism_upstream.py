"""h0mini.eval.plism against plism-benchmark's own arithmetic, on identical arrays.

The reference is ``plismbench_transcription.py`` (an independent transcription of the upstream
files and commits named in its docstring). In the default mode every number must be *identical*
(``==``, no tolerance): plism-benchmark's numbers are float16 values and counts, and h0mini
claims to reproduce them bit for bit, including float16 ties, the dropped position 0 of
``argpartition`` and the rounding of aggregates.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

import plismbench_transcription as upstream  # noqa: E402

from h0mini.errors import EvaluationInputError  # noqa: E402
from h0mini.eval import plism  # noqa: E402
from h0mini.eval.plism import (  # noqa: E402
    aggregate,
    evaluate_slides,
    leaderboard_results,
    leaderboard_score,
    pair_metrics,
    results_table,
    tile_subset,
)

KS = (1, 3, 5, 10)


def related_pair(seed, n, d, noise, kind):
    """Two slides of the same tiles; ``kind`` picks the edge case the data exercise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d))
    a = base + noise * rng.normal(size=base.shape)
    b = 2.5 * base + 2.5 * noise * rng.normal(size=base.shape)
    if kind == "coarse":  # small integers: float16 cosines tie all the time
        a, b = np.round(a), np.round(b)
        a[~a.any(axis=1), 0] = 1
        b[~b.any(axis=1), 0] = 1
    elif kind == "identical":  # B == A: the matched tile ties with the tile itself
        b = a.copy()
    elif kind == "duplicates":  # tile 2i+1 repeats tile 2i in both slides
        a[1::2], b[1::2] = a[0::2][: n // 2], b[0::2][: n // 2]
    elif kind == "near-duplicates":  # many neighbours within a float16 ulp of each other
        a = base[:, :1] + 1e-3 * rng.normal(size=base.shape)
        b = base[:, :1] + 1e-3 * rng.normal(size=base.shape)
    return a.astype(np.float32), b.astype(np.float32)


CASES = [
    (seed, n, d, noise, kind)
    for seed, (n, d, noise, kind) in enumerate(
        [
            (80, 32, 0.8, "plain"),
            (150, 48, 1.5, "plain"),
            (61, 8, 1.0, "coarse"),
            (120, 16, 2.0, "coarse"),
            (70, 24, 1.0, "identical"),
            (90, 12, 0.7, "duplicates"),
            (64, 16, 1.0, "near-duplicates"),
            (6, 5, 1.0, "plain"),  # k up to 2n - 1 = 11
        ]
    )
]


@pytest.mark.parametrize("seed, n, d, noise, kind", CASES)
def test_pair_metrics_identical_to_plism_benchmark(seed, n, d, noise, kind):
    a, b = related_pair(seed, n, d, noise, kind)
    want = upstream.pair_metrics(a, b, KS)
    for chunk_size in (7, 4096):  # chunks must not change anything
        assert pair_metrics(a, b, ks=KS, chunk_size=chunk_size) == want
    if kind in ("plain", "coarse"):
        assert 0 < want["top_1_accuracy"] < 1  # the data exercise the ranking


def test_float16_ties_are_broken_as_upstream():
    # Coarse features: the matched cosine ties with a competitor at the k-th place in many rows,
    # where any other tie rule (for example "a tie goes to the match") gives other numbers.
    a, b = related_pair(11, 100, 6, 1.5, "coarse")
    want = upstream.pair_metrics(a, b, KS)
    assert pair_metrics(a, b, ks=KS) == want
    assert pair_metrics(a, b, ks=KS, precision="float32") != want


def test_identical_slides_follow_upstream_self_exclusion():
    # plism-benchmark drops argpartition's position 0 as "the tile itself"; with B == A the
    # matched tile ties with it and one of the two is dropped: top-k about 0.5, not 1.
    a, _ = related_pair(3, 50, 16, 1.0, "plain")
    default = pair_metrics(a, a.copy(), ks=KS)
    assert default == upstream.pair_metrics(a, a.copy(), KS)
    assert 0.3 < default["top_1_accuracy"] < 0.7
    assert pair_metrics(a, a.copy(), ks=KS, precision="float32")["top_1_accuracy"] == 1.0


def test_cosine_is_a_float16_mean():
    a, b = related_pair(5, 40, 20, 1.0, "plain")
    got = plism.cosine_similarity(a, b)
    assert got == upstream.pair_metrics(a, b, (1,))["cosine_similarity"]
    assert np.float16(got) == got


def grid_with_replicates(n=24, d=8, seed=0):
    """2 stainings x 2 scanners, plus a rescan of GM on P (a replicate pair)."""
    rng = np.random.default_rng(seed)
    tissue = rng.normal(size=(n, d))
    names = ["GM_P", "GM_P_rescan", "GM_SQ", "HR_P", "HR_SQ"]
    return {name: (tissue + 1.2 * rng.normal(size=tissue.shape)).astype(np.float32) for name in names}


def test_evaluate_slides_tables_identical_to_plism_benchmark():
    feats = grid_with_replicates()
    pairs = evaluate_slides(feats, ks=KS, progress=False)
    for row in pairs.itertuples():
        want = upstream.pair_metrics(feats[row.slide_a], feats[row.slide_b], KS)
        assert {m: getattr(row, m) for m in want} == want
    metrics = plism.metric_names(KS)
    # the replicate pair (GM_P, GM_P_rescan) counts in both inter groups, as upstream
    table = aggregate(pairs)
    assert table["n_pairs"].to_dict() == {"cross-scanner": 4, "cross-staining": 4, "cross-both": 3, "all": 10}
    expected = upstream.results(pairs, metrics)
    got = results_table(pairs)
    assert list(got.index) == upstream.GROUP_ROWS
    assert got.to_dict(orient="index") == expected
    assert leaderboard_score(pairs) == upstream.leaderboard(pairs)
    row = leaderboard_results(pairs)
    assert row["Leaderboard metric"] == upstream.leaderboard(pairs)
    assert list(row)[:4] == [
        "Cosine similarity (all)",
        "Top-10 accuracy (cross-scanner)",
        "Top-10 accuracy (cross-staining)",
        "Top-10 accuracy (cross-scanner, cross-staining)",
    ]


def test_published_leaderboard_rounding():
    # The 14 rows of plism-benchmark's leaderboard (README, 03/03/2025): the score is the mean of
    # the four rounded medians, rounded to 3 decimals (half to even: 0.4985 -> 0.498).
    published = [
        (0.800, 0.864, 0.318, 0.183, 0.541), (0.846, 0.752, 0.241, 0.155, 0.498),
        (0.685, 0.744, 0.327, 0.166, 0.480), (0.777, 0.609, 0.306, 0.163, 0.464),
        (0.570, 0.592, 0.118, 0.054, 0.333), (0.591, 0.501, 0.190, 0.046, 0.332),
        (0.764, 0.346, 0.147, 0.045, 0.325), (0.547, 0.532, 0.169, 0.053, 0.325),
        (0.594, 0.356, 0.092, 0.017, 0.265), (0.878, 0.054, 0.040, 0.004, 0.244),
        (0.622, 0.125, 0.021, 0.004, 0.193), (0.569, 0.115, 0.041, 0.006, 0.183),
        (0.557, 0.064, 0.030, 0.003, 0.164), (0.490, 0.061, 0.030, 0.008, 0.147),
    ]  # fmt: skip
    for cosine, scanner, staining, both, score in published:
        pairs = pd.DataFrame(
            {
                "staining_a": ["GM", "GM", "GM", "GM"], "staining_b": ["GM", "GM", "HR", "HR"],
                "scanner_a": ["P", "P", "P", "P"], "scanner_b": ["SQ", "SQ", "P", "SQ"],
                "cosine_similarity": [cosine] * 4, "top_10_accuracy": [scanner, scanner, staining, both],
            }
        )  # fmt: skip
        assert leaderboard_score(pairs) == score


def test_tile_subsets_are_shipped_with_attribution():
    data = resources.files("h0mini.eval.plism").joinpath("data")
    assert "CC BY 4.0" in data.joinpath("ATTRIBUTION.md").read_text(encoding="utf-8")
    for size in plism.SUBSET_SIZES:
        indices = tile_subset(size)
        assert len(indices) == size == len(np.unique(indices))
        assert 0 <= indices.min() and indices.max() < plism.PLISM_TILES_PER_SLIDE
    assert tile_subset(8139)[:3].tolist() == [7181, 7409, 12071]  # upstream order, not sorted
    assert np.array_equal(tile_subset(16278), np.arange(16278))
    with pytest.raises(EvaluationInputError, match="460, 2713, 5426, 8139"):
        tile_subset(1000)


def test_tiles_choose_upstream_subsets():
    # tiles=460 evaluates upstream's 460-tile subset of 16,278-tile slides, in upstream's order.
    rng = np.random.default_rng(7)
    tissue = rng.normal(size=(plism.PLISM_TILES_PER_SLIDE, 3))
    feats = {name: (tissue + 0.5 * rng.normal(size=tissue.shape)).astype(np.float32) for name in ("GM_P", "GM_SQ")}
    subset = tile_subset(460)
    small = evaluate_slides(feats, ks=(1, 3), tiles=460, progress=False)
    want = upstream.pair_metrics(feats["GM_P"][subset], feats["GM_SQ"][subset], (1, 3))
    assert {m: small.loc[0, m] for m in want} == want
    # the default: the leaderboard's 8,139 tiles for PLISM-sized slides, every tile otherwise
    assert np.array_equal(plism.subsets.resolve_tiles("default", 16278), tile_subset(8139))
    assert plism.subsets.resolve_tiles("default", 500) is None
    assert plism.subsets.resolve_tiles(None, 16278) is None and plism.subsets.resolve_tiles("all", 16278) is None
    with pytest.raises(EvaluationInputError, match="slides have 500 tiles"):
        plism.subsets.resolve_tiles(8139, 500)
    with pytest.raises(EvaluationInputError, match="repeated"):
        plism.subsets.resolve_tiles([1, 1], 500)
