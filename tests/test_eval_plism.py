"""PLISM metrics: published test vectors, a brute-force reference, pair groups, runner and errors."""

from __future__ import annotations

import itertools
import math
import warnings

import h5py
import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")

from h0mini.errors import EvaluationInputError, H0miniError  # noqa: E402
from h0mini.eval import plism  # noqa: E402
from h0mini.eval.plism import (  # noqa: E402
    PLISM_SCANNERS,
    PLISM_STAININGS,
    aggregate,
    cosine_similarity,
    evaluate_slides,
    leaderboard_score,
    pair_metrics,
    parse_slide_name,
    slide_pairs,
    top_k_accuracy,
)

PLISM_NAMES = [f"{staining}_{scanner}" for staining in PLISM_STAININGS for scanner in PLISM_SCANNERS]


def reference_metrics(a, b, ks, precision="float16"):
    """The definition, spelled out: pool 2n rows, full similarity matrix, sort each row without itself."""
    dtype = np.float16 if precision == "float16" else np.float32
    ab = np.concatenate([a, b]).astype(dtype).astype(np.float64)
    unit = ab / np.linalg.norm(ab, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(a)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    out = {"cosine_similarity": float(np.mean(np.sum(unit[:n] * unit[n:], axis=1)))}
    for k in ks:
        top = order[:, :k]
        hit_a = np.any(top[:n] == np.arange(n, 2 * n)[:, None], axis=1).mean()
        hit_b = np.any(top[n:] == np.arange(n)[:, None], axis=1).mean()
        out[f"top_{k}_accuracy"] = (hit_a + hit_b) / 2
    return out


# --- published test vectors (REFERENCE.md section 4, plism-benchmark's own tests) -------------


def test_cosine_test_vector():
    a = [[0, 1], [1, 0], [1, 1], [1, 1]]
    b = [[0, 2], [2, 0], [-1, -1], [0, 1]]
    # (1 + 1 - 1 + 1/sqrt(2)) / 4. float32 arithmetic: only float32 rounding, < 1e-6. The default,
    # plism-benchmark's float16 arithmetic, takes a float16 mean: within half a float16 ulp (2^-12).
    expected = (1 + 1 - 1 + 1 / math.sqrt(2)) / 4
    assert abs(expected - 0.4267767) < 1e-7
    assert cosine_similarity(a, b, precision="float32") == pytest.approx(expected, abs=1e-6)
    assert cosine_similarity(a, b) == float(np.float16(expected))
    assert pair_metrics(a, b, ks=(1,), precision="float32")["cosine_similarity"] == pytest.approx(expected, abs=1e-6)
    assert cosine_similarity(a, b, precision="float32") == pytest.approx(expected, abs=1e-6)


def test_top_k_test_vector():
    a = [[0, 1], [1, 0], [0, -1], [-1, 0]]
    b = [[0.1, 1.1], [0.2, 1.1], [0.3, 1.1], [0.4, 1.1]]
    # Accuracies are hit counts over 2n = 8 rows: exact binary fractions, compared exactly.
    assert top_k_accuracy(a, b, (1, 7)) == {1: 0.125, 7: 1.0}
    assert top_k_accuracy(a, b, (1, 7), precision="float32") == {1: 0.125, 7: 1.0}
    assert top_k_accuracy(torch.tensor(a, dtype=torch.float64), torch.tensor(b), (1,)) == {1: 0.125}


@pytest.mark.parametrize("n", [2, 5, 17])
def test_k_equal_2n_minus_1_is_always_a_hit(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    assert top_k_accuracy(a, b, (2 * n - 1,)) == {2 * n - 1: 1.0}


def test_identical_slides_give_one_in_float32():
    # float32 mode: the matched tile wins the tie with the tile itself. (plism-benchmark's own
    # arithmetic drops one of the two: see test_eval_plism_upstream.py.)
    a = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    metrics = pair_metrics(a, a.copy(), ks=(1, 3, 5, 10), precision="float32")
    assert metrics["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert {k: v for k, v in metrics.items() if k.startswith("top")} == {
        "top_1_accuracy": 1.0, "top_3_accuracy": 1.0, "top_5_accuracy": 1.0, "top_10_accuracy": 1.0,
    }  # fmt: skip


# --- against the brute-force definition; chunking -----------------------------------------------


@pytest.mark.parametrize("precision", ["float32"])
def test_matches_brute_force_definition(precision):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, 24))
    # Related slides, so that the ranks are neither all hits nor all misses.
    a = base + 0.6 * rng.normal(size=base.shape)
    b = 3.0 * base + 1.8 * rng.normal(size=base.shape)
    ks = (1, 3, 5, 10, 20)
    got = pair_metrics(a, b, ks=ks, precision=precision, chunk_size=7)
    want = reference_metrics(a, b, ks, precision)
    assert got["cosine_similarity"] == pytest.approx(want["cosine_similarity"], abs=1e-6)
    for k in ks:
        assert got[f"top_{k}_accuracy"] == want[f"top_{k}_accuracy"], k
    assert 0.05 < got["top_1_accuracy"] < 0.95  # the data exercise the ranking


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(97, 32)), rng.normal(size=(97, 32))
    b[:50] = a[:50] + 0.5 * rng.normal(size=(50, 32))
    whole = pair_metrics(a, b, chunk_size=10_000)
    for chunk in (1, 3, 16, 96):
        assert pair_metrics(a, b, chunk_size=chunk) == whole


def test_float16_rounding_is_applied():
    # Differences below float16 resolution vanish with the benchmark's precision, not without it.
    a = np.ones((4, 8), dtype=np.float32) + np.eye(4, 8, dtype=np.float32)
    b = a + np.float32(1e-5) * np.arange(32, dtype=np.float32).reshape(4, 8)
    assert np.array_equal(a.astype(np.float16), b.astype(np.float16))
    assert cosine_similarity(a, b) == cosine_similarity(a, a)
    assert cosine_similarity(a, b, precision="float32") != cosine_similarity(a, a, precision="float32")
    # The all-float16 computation of the benchmark agrees to its 1e-3 publication precision.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 64)), rng.normal(size=(50, 64)) + 0.5
    x16, y16 = x.astype(np.float16), y.astype(np.float16)
    benchmark = np.mean(np.sum(x16 * y16, axis=1) / (np.linalg.norm(x16, axis=1) * np.linalg.norm(y16, axis=1)))
    assert cosine_similarity(x, y) == pytest.approx(float(benchmark), abs=1e-3)


# --- slide names and groups -------------------------------------------------------------------


def test_plism_pair_counts():
    pairs = slide_pairs(PLISM_NAMES)
    assert len(pairs) == 4095
    assert pairs["group"].value_counts().to_dict() == {"cross-both": 3276, "cross-staining": 546, "cross-scanner": 273}


def test_parse_slide_names():
    assert parse_slide_name("GIVH_AT2") == ("GIVH", "AT2")
    assert parse_slide_name("GIVH_AT2_to_GMH_S60.tif") == ("GIVH", "AT2")
    custom = r"scanner-(?P<scanner>\w+?)__stain-(?P<staining>\w+)"
    assert parse_slide_name("scanner-GT450__stain-HR", custom) == ("HR", "GT450")
    with pytest.raises(EvaluationInputError, match="'slide7'"):
        parse_slide_name("slide7")
    with pytest.raises(ValueError, match="named groups"):
        parse_slide_name("GIVH_AT2", r"(?P<staining>\w+)")


def test_pair_group():
    assert plism.pair_group("GM", "P", "GM", "SQ") == "cross-scanner"
    assert plism.pair_group("GM", "P", "HR", "P") == "cross-staining"
    assert plism.pair_group("GM", "P", "HR", "SQ") == "cross-both"
    assert plism.pair_group("GM", "P", "GM", "P") == "replicate"


# --- the all-pairs runner -------------------------------------------------------------------


def grid_features(stainings=("GM", "HR", "KR"), scanners=("AT2", "P"), n=12, d=6, seed=0):
    rng = np.random.default_rng(seed)
    tissue = rng.normal(size=(n, d))
    out = {}
    for i, st in enumerate(stainings):
        for j, sc in enumerate(scanners):
            # Staining and scanner each shift the features; tiles stay recognisable.
            shift = 0.5 * np.sin(np.arange(d) * (i + 1)) + 0.3 * np.cos(np.arange(d) * (j + 2))
            out[f"{st}_{sc}"] = (tissue + shift + 0.4 * rng.normal(size=(n, d))).astype(np.float32)
    return out


def test_runner_matches_pair_metrics_and_aggregates():
    feats = grid_features()
    pairs = evaluate_slides(feats, ks=(1, 3, 10), chunk_size=5)
    assert len(pairs) == 15
    assert set(pairs["group"]) == {"cross-scanner", "cross-staining", "cross-both"}
    for row in pairs.itertuples():
        want = pair_metrics(feats[row.slide_a], feats[row.slide_b], ks=(1, 3, 10))
        assert row.cosine_similarity == pytest.approx(want["cosine_similarity"], abs=1e-6)
        assert row.top_1_accuracy == want["top_1_accuracy"]
        assert row.top_10_accuracy == want["top_10_accuracy"]
    table = aggregate(pairs, decimals=None)
    assert list(table.index) == ["cross-scanner", "cross-staining", "cross-both", "all"]
    assert table["n_pairs"].to_dict() == {"cross-scanner": 3, "cross-staining": 6, "cross-both": 6, "all": 15}
    column = pairs.loc[pairs["group"] == "cross-both", "top_1_accuracy"].to_numpy()
    assert table.loc["cross-both", "top_1_accuracy_mean"] == pytest.approx(column.mean())
    assert table.loc["cross-both", "top_1_accuracy_std"] == pytest.approx(column.std(ddof=0))
    assert table.loc["cross-both", "top_1_accuracy_median"] == pytest.approx(np.median(column))
    q75, q25 = np.quantile(column, [0.75, 0.25])
    assert table.loc["cross-both", "top_1_accuracy_iqr"] == pytest.approx(q75 - q25)
    median = {g: pairs.loc[pairs["group"] == g, "top_10_accuracy"].median() for g in ("cross-scanner", "cross-staining", "cross-both")}
    expected = np.mean([pairs["cosine_similarity"].median(), *median.values()])
    assert leaderboard_score(pairs, decimals=None) == pytest.approx(expected)
    rounded = np.round([pairs["cosine_similarity"].median(), *median.values()], 3)
    assert leaderboard_score(pairs) == np.round(np.mean(rounded), 3)


def test_full_plism_grid_runs_and_scores():
    rng = np.random.default_rng(4)
    tissue = rng.normal(size=(11, 4))
    feats = {name: tissue + 0.8 * rng.normal(size=tissue.shape) for name in PLISM_NAMES}
    pairs = evaluate_slides(feats, ks=(1, 10), progress=False)
    assert len(pairs) == 4095
    table = aggregate(pairs)
    assert table["n_pairs"].to_dict() == {"cross-scanner": 273, "cross-staining": 546, "cross-both": 3276, "all": 4095}
    assert 0.0 < leaderboard_score(pairs) < 1.0


def test_bounded_cache_gives_same_result():
    feats = grid_features(n=9)
    whole = evaluate_slides(feats, ks=(1, 3))
    bounded = evaluate_slides(feats, ks=(1, 3), max_slides_in_memory=2)
    pd.testing.assert_frame_equal(whole, bounded)


def test_folder_of_feature_files(tmp_path):
    feats = grid_features(stainings=("GM", "HR"), scanners=("AT2", "P"), n=8)
    coords = np.stack([np.arange(8) * 224, np.zeros(8)], axis=1).astype(np.int64)
    names = sorted(feats)
    for name in names[:2]:  # as `h0mini embed` writes them
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["features"] = feats[name]
            f["coords"] = coords
            f["tile_names"] = np.array([f"{name}/tile_{i}.png".encode() for i in range(8)])
    np.save(tmp_path / f"{names[2]}.npy", feats[names[2]])
    torch.save({"features": torch.from_numpy(feats[names[3]]), "coords": torch.from_numpy(coords)}, tmp_path / f"{names[3]}.pt")
    (tmp_path / "notes.txt").write_text("not a feature file")
    from_folder = evaluate_slides(tmp_path, ks=(1, 3))
    pd.testing.assert_frame_equal(from_folder, evaluate_slides(feats, ks=(1, 3)))
    with h5py.File(tmp_path / f"{names[0]}.h5", "a") as f:
        f["coords"][3, 0] = 1
    with pytest.raises(EvaluationInputError, match="field 'coords' differs"):
        evaluate_slides(tmp_path, ks=(1, 3))


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature files"):
        evaluate_slides(tmp_path)
    with h5py.File(tmp_path / "GM_P.h5", "w") as f:
        f["embeddings"] = np.ones((3, 2))
    np.save(tmp_path / "HR_P.npy", np.ones((3, 2)))
    with pytest.raises(EvaluationInputError, match="no 'features' dataset"):
        evaluate_slides(tmp_path, ks=(1,))


def test_folder_plismbench_layout(tmp_path):
    feats = grid_features(stainings=("GM", "HR"), scanners=("AT2",), n=8)
    for name, x in feats.items():
        (tmp_path / name).mkdir()
        coords = np.concatenate([np.zeros((8, 1)), np.arange(16).reshape(8, 2)], axis=1)
        np.save(tmp_path / name / "features.npy", np.concatenate([coords, x], axis=1).astype(np.float32))
    pairs = evaluate_slides(tmp_path, ks=(1,), coords_columns=3)
    want = pair_metrics(feats["GM_AT2"], feats["HR_AT2"], ks=(1,))
    assert pairs.loc[0, "cosine_similarity"] == pytest.approx(want["cosine_similarity"], abs=1e-6)


def test_tiles_subset():
    feats = grid_features(n=20)
    subset = np.arange(0, 20, 2)
    pairs = evaluate_slides(feats, ks=(1,), tiles=subset)
    first = pairs.iloc[0]
    want = pair_metrics(feats[first.slide_a][subset], feats[first.slide_b][subset], ks=(1,))
    assert first.top_1_accuracy == want["top_1_accuracy"]


# --- bad input: clear errors naming the slide or field -----------------------------------------


def test_mismatched_tile_counts_name_the_slide():
    feats = grid_features(n=10)
    feats["HR_P"] = feats["HR_P"][:9]
    with pytest.raises(EvaluationInputError, match=r"slide 'HR_P' has 9 tiles but slide 'GM_AT2' has 10"):
        evaluate_slides(feats)
    with pytest.raises(EvaluationInputError, match="tiles"):
        pair_metrics(np.ones((3, 2)), np.ones((4, 2)))


def test_mismatched_coords_name_the_slide_and_field(tmp_path):
    feats = grid_features(stainings=("GM", "HR"), scanners=("P",), n=6)
    coords = np.arange(12).reshape(6, 2)
    moved = coords.copy()
    moved[4] += 224
    values = {"GM_P": {"features": feats["GM_P"], "coords": coords}, "HR_P": {"features": feats["HR_P"], "coords": moved}}
    with pytest.raises(EvaluationInputError, match=r"slide 'HR_P': field 'coords' differs from slide 'GM_P' at tile 4"):
        evaluate_slides(values, ks=(1,))
    assert len(evaluate_slides(values, ks=(1,), check_coords=False)) == 1


def test_nan_features_name_the_slide_and_tile():
    feats = grid_features(n=8)
    feats["KR_AT2"][5, 2] = np.nan
    with pytest.raises(EvaluationInputError, match=r"slide 'KR_AT2'.*NaN.*tile 5"):
        evaluate_slides(feats, ks=(1,))


def test_zero_and_overflowing_features():
    with pytest.raises(EvaluationInputError, match="tile 1 has an all-zero"):
        pair_metrics([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]], ks=(1,))
    with pytest.raises(EvaluationInputError, match="float16 range"):
        pair_metrics([[1e6, 0.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], ks=(1,))
    assert pair_metrics([[1e6, 0.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], ks=(1,), precision="float32")


def test_unknown_slide_name_is_named():
    feats = grid_features(stainings=("GM",), scanners=("P", "SQ"), n=5)
    feats["scan42"] = feats["GM_P"]
    with pytest.raises(EvaluationInputError, match="slide 'scan42' does not match"):
        evaluate_slides(feats)


def test_empty_group_is_named():
    feats = grid_features(stainings=("GM", "HR"), scanners=("P",), n=5)  # one scanner: no cross-scanner pair
    pairs = evaluate_slides(feats, ks=(1, 3))
    with pytest.raises(EvaluationInputError, match="group 'cross-scanner' has no slide pairs"):
        aggregate(pairs)
    assert list(aggregate(pairs, groups=["cross-staining", "all"]).index) == ["cross-staining", "all"]
    with pytest.raises(EvaluationInputError, match="top_10_accuracy"):
        leaderboard_score(pairs)


def test_bad_k_and_arguments():
    a = np.eye(3)
    with pytest.raises(EvaluationInputError, match="2n-1 = 5"):
        top_k_accuracy(a, a, (6,))
    with pytest.raises(EvaluationInputError, match="float16"):
        pair_metrics(a, a, precision="bfloat16")
    with pytest.raises(H0miniError):
        evaluate_slides({"GM_P": a})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    feats = grid_features(n=64, d=32)
    cpu = evaluate_slides(feats, ks=(1, 3, 10), device="cpu")
    gpu = evaluate_slides(feats, ks=(1, 3, 10), device="cuda")
    pd.testing.assert_frame_equal(cpu, gpu, atol=1e-6, rtol=0)


def test_blocked_pair_order_visits_every_pair_once():
    names = [f"s{i:02d}" for i in range(9)]
    for block in (1, 2, 4, 9):
        visited = list(plism.runner._blocked_pairs(names, block))
        assert sorted(visited) == list(itertools.combinations(names, 2))


def test_progress_bar_only_when_asked(capsys):
    feats = grid_features(stainings=("GM",), scanners=("P", "SQ"), n=5)
    evaluate_slides(feats, ks=(1,))  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
    evaluate_slides(feats, ks=(1,), progress=True)
    assert "PLISM pairs" in capsys.readouterr().err


def test_missing_optional_dependency_says_how_to_install(monkeypatch):
    from h0mini.errors import OptionalDependencyError

    from h0mini.eval import common

    real = common.importlib.import_module

    def fake_import(name, *args):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real(name, *args)

    monkeypatch.setattr(common.importlib, "import_module", fake_import)
    with pytest.raises(OptionalDependencyError, match=r"PLISM pair tables needs the package 'pandas'.*h0mini\[eval\]"):
        slide_pairs(["GM_P", "HR_P"])


# --- registration by tile names, provenance and the plism-benchmark layout ----------------------


def write_embed_file(path, features, tile_names, *, output="cls", skipped=(), coords=None):
    """A feature file as `h0mini embed` writes it (.h5, .npy + sidecar or .pt)."""
    from h0mini.writers import Embeddings, write_embeddings

    provenance = {"output": output, "weights": "test"}
    write_embeddings(path, Embeddings({"features": features}, list(tile_names), coords, provenance, list(skipped)))


@pytest.mark.parametrize("suffix", [".h5", ".npy", ".pt"])
def test_tile_names_without_coords_must_match(tmp_path, suffix):
    feats = grid_features(stainings=("GM", "HR"), scanners=("P",), n=6)
    names = [f"tile_{i}.png" for i in range(6)]
    # Each slide's tiles live in the slide's own folder: only the file name has to agree.
    write_embed_file(tmp_path / f"GM_P{suffix}", feats["GM_P"], [f"/data/GM_P/{n}" for n in names])
    write_embed_file(tmp_path / f"HR_P{suffix}", feats["HR_P"], [f"/data/HR_P/{n}" for n in names])
    assert len(evaluate_slides(tmp_path, ks=(1,))) == 1
    # HR_P lost tile 2 (`--on-error skip`) and has one more tile at the end: same count, shifted rows.
    shifted = names[:2] + names[3:] + ["tile_6.png"]
    write_embed_file(tmp_path / f"HR_P{suffix}", feats["HR_P"], [f"/data/HR_P/{n}" for n in shifted])
    with pytest.raises(
        EvaluationInputError,
        match=r"slide 'HR_P': field 'tile_names' differs from slide 'GM_P' at tile 2 \('tile_3.png' vs 'tile_2.png'\)",
    ):
        evaluate_slides(tmp_path, ks=(1,))
    assert len(evaluate_slides(tmp_path, ks=(1,), check_coords=False)) == 1


def test_tile_names_may_carry_the_slide_name():
    feats = grid_features(stainings=("GM", "HR"), scanners=("P",), n=4)
    values = {
        name: {"features": feats[name], "tile_names": [f"{name}_x{i * 224}_y0.png" for i in range(4)]} for name in feats
    }
    assert len(evaluate_slides(values, ks=(1,))) == 1
    values["HR_P"]["tile_names"] = values["HR_P"]["tile_names"][::-1]
    with pytest.raises(EvaluationInputError, match=r"slide 'HR_P': field 'tile_names' differs from slide 'GM_P' at tile 0"):
        evaluate_slides(values, ks=(1,))


def test_skipped_tiles_without_names_or_coords_warn(tmp_path):
    feats = grid_features(stainings=("GM", "HR"), scanners=("P",), n=5)
    with h5py.File(tmp_path / "GM_P.h5", "w") as f:
        f["features"] = feats["GM_P"]
    with h5py.File(tmp_path / "HR_P.h5", "w") as f:
        f["features"] = feats["HR_P"]
        f.attrs["skipped"] = '[{"index": 1, "path": "HR_P/tile_1.png", "reason": "truncated"}]'
    with pytest.warns(UserWarning, match=r"HR_P.h5.*1 tile\(s\) skipped.*no tile names or coordinates"):
        evaluate_slides(tmp_path, ks=(1,))


def test_non_cls_features_warn_once_per_run(tmp_path):
    feats = grid_features(stainings=("GM", "HR", "KR"), scanners=("P",), n=5)
    for name, x in feats.items():
        write_embed_file(tmp_path / f"{name}.h5", x, [f"t{i}.png" for i in range(5)], output="cls+mean")
    with pytest.warns(UserWarning, match=r"GM_P.h5.*output mode 'cls\+mean'.*--output-mode cls") as record:
        evaluate_slides(tmp_path, ks=(1,))
    assert sum("output mode" in str(w.message) for w in record) == 1
    with pytest.warns(UserWarning, match="output mode 'cls\\+mean'"):
        plism.load_slide_features(tmp_path / "HR_P.h5")
    for name, x in feats.items():
        write_embed_file(tmp_path / f"{name}.npy", x, [f"t{i}.png" for i in range(5)], output="cls")
        (tmp_path / f"{name}.h5").unlink()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_slides(tmp_path, ks=(1,))


def test_plismbench_layout_strips_coordinate_columns_by_default(tmp_path):
    feats = grid_features(stainings=("GM", "HR"), scanners=("AT2",), n=8)
    coords = np.concatenate([np.zeros((8, 1)), np.arange(16).reshape(8, 2) * 224], axis=1)
    for name, x in feats.items():
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "features.npy", np.concatenate([coords, x], axis=1).astype(np.float32))
    want = pair_metrics(feats["GM_AT2"], feats["HR_AT2"], ks=(1,))
    pairs = evaluate_slides(tmp_path, ks=(1,))
    assert pairs.loc[0, "cosine_similarity"] == pytest.approx(want["cosine_similarity"], abs=1e-6)
    loaded = plism.load_slide_features(tmp_path / "GM_AT2" / "features.npy")
    assert loaded.features.shape == (8, 6) and np.array_equal(loaded.coords, coords)
    # The explicit argument wins: all columns are features.
    raw = evaluate_slides(tmp_path, ks=(1,), coords_columns=0, precision="float32")
    assert raw.loc[0, "cosine_similarity"] != pytest.approx(want["cosine_similarity"], abs=1e-3)


# --- float32 mode: duplicated tiles ------------------------------------------------------------


def test_float32_duplicate_tiles_tie_goes_to_the_match():
    # Tile 2i+1 repeats tile 2i in both slides. For A_2i, B_2i+1 equals the target B_2i: a tie the
    # matched tile wins (as documented), however the matrix product rounds the two similarities.
    # A_2i+1 equals A_2i itself, so it is a real competitor (similarity 1). Reference: float64
    # brute force with that rule.
    rng = np.random.default_rng(12)
    base = rng.normal(size=(40, 24))
    a, b = base + 0.7 * rng.normal(size=base.shape), base + 0.7 * rng.normal(size=base.shape)
    a[1::2], b[1::2] = a[0::2], b[0::2]
    a, b = a.astype(np.float32), b.astype(np.float32)
    pooled = np.concatenate([a, b]).astype(np.float64)
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(a)
    ranks = []
    for row in range(2 * n):
        target = (row + n) % (2 * n)
        identical_to_target = np.all(pooled == pooled[target], axis=1)
        beats = (sims[row] > sims[row, target]) & ~identical_to_target
        beats[row] = False
        ranks.append(int(beats.sum()))
    ranks = np.array(ranks)
    got = pair_metrics(a, b, ks=(1, 3, 5), precision="float32", chunk_size=9)
    for k in (1, 3, 5):
        want = ((ranks[:n] < k).mean() + (ranks[n:] < k).mean()) / 2
        assert got[f"top_{k}_accuracy"] == want, k
    assert got["top_3_accuracy"] > 0  # duplicates do not hide every match


def test_identical_slides_warn_that_float16_ties_halve_top_1_and_point_to_float32():
    from h0mini.eval.plism import pair_metrics

    features = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"identical float16 features.*precision='float32'"):
        half = pair_metrics(features, features.copy(), ks=(1,))
    assert half["top_1_accuracy"] < 0.75  # plism-benchmark's own tie behaviour, kept as the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning in float32, and a distinct pair never warns
        assert pair_metrics(features, features.copy(), ks=(1,), precision="float32")["top_1_accuracy"] == 1.0
        pair_metrics(features, features + 0.01, ks=(1,))
