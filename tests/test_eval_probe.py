"""Linear probe, kNN, logistic regression and the robustness index on synthetic data with known answers."""

from __future__ import annotations

import math

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pd = pytest.importorskip("pandas")

from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from h0mini.errors import EvaluationInputError  # noqa: E402
from h0mini.eval.probe import (  # noqa: E402
    balanced_accuracy,
    knn_probe,
    linear_probe,
    logistic_probe,
    make_split,
    robustness_index,
    run_probes,
)

FAST = dict(seeds=(0, 1, 2), max_steps=1500, eval_every=50, patience=400)


def blobs(n_per_class=150, n_classes=3, dim=16, separation=6.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres *= separation / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), np.array([f"class_{c}" for c in labels])


def test_balanced_accuracy_matches_sklearn():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2])
    # per-class recall 3/4, 1/2, 1/1
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_separable_classes_reach_one():
    x, y = blobs()
    result = linear_probe(x, y, **FAST)
    assert result.method == "linear"
    assert len(result.scores) == 3
    assert result.mean >= 0.97
    assert result.std <= 0.03
    assert knn_probe(x, y).mean >= 0.97
    assert logistic_probe(x, y).mean >= 0.97


def test_random_labels_give_chance():
    x, _ = blobs(n_per_class=200, n_classes=4, separation=0.0)
    y = np.random.default_rng(1).integers(0, 4, size=len(x))
    for result in (linear_probe(x, y, **FAST), knn_probe(x, y), logistic_probe(x, y)):
        assert abs(result.mean - 0.25) < 0.1, (result.method, result.mean)


def test_linear_probe_is_deterministic_and_early_stops():
    x, y = blobs(seed=3)
    first = linear_probe(x, y, **FAST)
    second = linear_probe(x, y, **FAST)
    assert first.scores == second.scores
    assert first.details["best_step"] == second.details["best_step"]
    # Perfect validation is reached early; patience then stops training long before max_steps.
    long = linear_probe(x, y, seeds=(0,), max_steps=5000, eval_every=10, patience=50)
    assert long.details["best_step"][0] < 1000
    assert long.mean >= 0.97


def test_given_split_and_groups():
    x, y = blobs(n_per_class=60)
    groups = np.arange(len(x)) % 18  # 18 "slides" of 10 tiles, each with tissue of every class
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class reaches val and test: no warning
        split = make_split(y, groups=groups, seed=0)
    assert set(split) == {"train", "val", "test"}
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1  # a slide never straddles two splits
    table = run_probes(x, y, split=split, seeds=(0, 1), max_steps=1500, knn_k=5)
    assert list(table["method"]) == ["linear", "knn", "logistic_regression"]
    assert list(table["n_runs"]) == [2, 1, 1]
    assert (table["balanced_accuracy_mean"] > 0.9).all()


def test_stratified_split_keeps_class_balance():
    _, y = blobs(n_per_class=100, n_classes=2)
    split = make_split(y, seed=4)
    for part, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        chosen = y[split == part]
        assert len(chosen) == pytest.approx(fraction * len(y), abs=2)
        assert (chosen == "class_0").mean() == pytest.approx(0.5, abs=0.02)


def test_probe_bad_input():
    x, y = blobs(n_per_class=20)
    x_nan = x.copy()
    x_nan[7, 3] = np.nan
    with pytest.raises(EvaluationInputError, match="row 7, dimension 3"):
        linear_probe(x_nan, y)
    with pytest.raises(EvaluationInputError, match="labels must be 1-D with one entry per embedding"):
        knn_probe(x, y[:-1])
    split = np.where(np.arange(len(y)) % 2 == 0, "train", "test")
    with pytest.raises(EvaluationInputError, match="no 'val'"):
        linear_probe(x, y, split=split)
    with pytest.raises(EvaluationInputError, match="unknown values"):
        knn_probe(x, y, split=np.full(len(y), "holdout"))
    assert knn_probe(x, y, split=split, k=5).mean > 0.9  # kNN needs no validation split


# --- robustness index -------------------------------------------------------------------------


def centre_data(centre_strength, n_per_cell=40, dim=16, seed=0):
    """2 labels x 3 centres x slides of 10 tiles: biology signal 4, centre signal ``centre_strength``."""
    rng = np.random.default_rng(seed)
    bio = rng.normal(size=(2, dim))
    bio *= 4.0 / np.linalg.norm(bio, axis=1, keepdims=True)
    site = rng.normal(size=(3, dim))
    site *= centre_strength / np.linalg.norm(site, axis=1, keepdims=True)
    rows, labels, centres, slides = [], [], [], []
    for label in range(2):
        for centre in range(3):
            for i in range(n_per_cell):
                slide = f"L{label}C{centre}S{i // 10}"
                rows.append(bio[label] + site[centre] + rng.normal(size=dim))
                labels.append(label)
                centres.append(f"centre_{centre}")
                slides.append(slide)
    return np.array(rows, dtype=np.float32), np.array(labels), np.array(centres), np.array(slides)


def test_ri_biology_dominates():
    x, labels, centres, slides = centre_data(centre_strength=0.0)
    result = robustness_index(x, labels, centres, slides=slides, k=10)
    assert result.ri > 0.95
    assert result.so > 0 and result.k == 10 and result.n == len(x)


def test_confounded_centre_lowers_ri():
    values = []
    for strength in (0.0, 3.0, 8.0):
        x, labels, centres, slides = centre_data(centre_strength=strength)
        values.append(robustness_index(x, labels, centres, slides=slides, k=10, chunk_size=37).ri)
    assert values[0] > values[1] > values[2]
    assert values[2] < 0.5  # the centre dominates


def test_ri_excludes_same_slide_neighbours():
    # Each slide holds two identical tiles: without slide ids every nearest neighbour is the twin
    # (same label, same centre: neither SO nor OS), so RI is undefined: NaN, as PathoROB gives
    # (0/0), with a warning, and another warning that slides were not given. With them it is defined.
    x, labels, centres, slides = centre_data(centre_strength=1.0, n_per_cell=10)
    x = np.repeat(x[::2], 2, axis=0)
    slides = np.repeat(np.arange(len(x) // 2), 2)
    with pytest.warns(UserWarning) as caught:
        undefined = robustness_index(x, labels, centres, k=1)
    assert math.isnan(undefined.ri) and undefined.so == undefined.os == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "undefined (0/0)" in messages and "PathoROB excludes every sample of the same slide" in messages
    assert 0.5 < robustness_index(x, labels, centres, slides=slides, k=1).ri <= 1.0


def test_ri_bad_input():
    x, labels, centres, slides = centre_data(centre_strength=1.0, n_per_cell=10)
    with pytest.raises(EvaluationInputError, match="at least two centres"):
        robustness_index(x, labels, np.zeros(len(x)), slides=slides)
    with pytest.raises(EvaluationInputError, match="centres must be 1-D"):
        robustness_index(x, labels, centres[:-1])
    with pytest.raises(EvaluationInputError, match="lower k"):
        robustness_index(x, labels, centres, slides=slides, k=len(x))


def test_split_with_too_few_samples_per_class_names_the_fractions():
    labels = np.repeat([f"class_{c}" for c in range(10)], 3)
    with pytest.raises(EvaluationInputError, match=r"test_fraction.*val_fraction.*'class_0': 3"):
        make_split(labels)
    with pytest.raises(EvaluationInputError, match="test_fraction"):
        linear_probe(np.random.default_rng(0).normal(size=(30, 4)), labels)


def test_split_warns_when_a_class_misses_val_or_test():
    labels = np.array(["a"] * 20 + ["b"] * 20 + ["rare"] * 2)
    with pytest.warns(UserWarning, match=r"class 'rare' \(2 samples\) has no sample in .*'(val|test)'"):
        split = make_split(labels)
    assert set(split) == {"train", "val", "test"}


def test_probes_accept_device_auto():
    x, y = blobs(n_per_class=30)
    auto = linear_probe(x, y, seeds=(0,), max_steps=100, device="auto")
    if not torch.cuda.is_available():  # "auto" is then the CPU: the very same run
        assert auto.scores == linear_probe(x, y, seeds=(0,), max_steps=100, device="cpu").scores
    xs, labels, centres, slides = centre_data(centre_strength=1.0, n_per_cell=10)
    cpu = robustness_index(xs, labels, centres, slides=slides, device="cpu")
    assert robustness_index(xs, labels, centres, slides=slides, device="auto").ri == pytest.approx(cpu.ri)


def test_linear_probe_defaults_are_evas_protocol():
    # eva main's patch-level protocol (h0mini.eval.eva): AdamW lr 3e-4, weight decay 0.01
    # (torch's default: eva sets none), batch 256, 12,500 steps, validation once per epoch
    # (eval_every=None: the protocol's), 5 runs, no early stopping unless the dataset's config
    # sets one. QUICK_PROBE is the shortcut.
    import inspect

    from h0mini.eval.probe import QUICK_PROBE, linear_probe, run_probes

    params = inspect.signature(linear_probe).parameters
    assert params["max_steps"].default == 12_500 and params["eval_every"].default is None
    assert params["protocol"].default == "main" and params["batch_norm"].default is None
    assert params["patience"].default == "eva" and params["dataset"].default is None
    assert params["lr"].default == 3e-4 and params["batch_size"].default == 256
    assert params["weight_decay"].default == 0.01 and len(params["seeds"].default) == 5
    assert inspect.signature(run_probes).parameters["max_steps"].default == 12_500
    assert inspect.signature(run_probes).parameters["protocol"].default == "main"
    assert QUICK_PROBE == {"max_steps": 2_000, "patience": 400}


def test_ri_neighbours_agree_with_sklearn_float64():
    # PathoROB ranks neighbours with scikit-learn in float64; same-slide neighbours are removed.
    from sklearn.neighbors import NearestNeighbors

    from h0mini.eval.probe import neighbour_counts

    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 12)).astype(np.float32)
    labels, centres, slides = rng.integers(0, 3, 90), rng.integers(0, 3, 90), np.repeat(np.arange(30), 3)
    k = 7
    found = NearestNeighbors(n_neighbors=len(x), metric="cosine", algorithm="brute").fit(x.astype(np.float64))
    order = found.kneighbors(x.astype(np.float64), return_distance=False)
    want = {"ss": 0, "so": 0, "os": 0, "oo": 0}
    for i, row in enumerate(order):
        kept = [j for j in row if slides[j] != slides[i]][:k]
        for j in kept:
            key = ("s" if labels[j] == labels[i] else "o") + ("s" if centres[j] == centres[i] else "o")
            want[key] += 1
    got = neighbour_counts(x, labels, centres, slides=slides, k=k)
    assert {"ss": got.ss, "so": got.so, "os": got.os, "oo": got.oo} == want
    ri = robustness_index(x, labels, centres, slides=slides, k=k)
    assert ri.ri == want["so"] / (want["so"] + want["os"])
    from h0mini.eval import de_jong_ratio

    ratio = de_jong_ratio(x, labels, centres, slides=slides, k=k)
    assert ratio == (want["ss"] + want["so"]) / (want["ss"] + want["os"])
