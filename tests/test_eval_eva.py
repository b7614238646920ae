"""The eva linear-probe protocol: the per-dataset table as read from eva's configs, and the probe using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from h0mini.errors import EvaluationInputError  # noqa: E402
from h0mini.eval import EVA_TASKS, eva_task, linear_probe  # noqa: E402
from h0mini.eval.eva import (  # noqa: E402
    EVA_BATCH_SIZE,
    EVA_EVAL_EVERY,
    EVA_LR,
    EVA_MAX_STEPS,
    EVA_RUNS,
    EVA_WEIGHT_DECAY,
)
from h0mini.eval.probe import _make_head  # noqa: E402

LATEST = "ad61be09e4031a0dc3d2360f472c13a3cd6960a7"

# Transcribed by hand from kaiko-ai/eva configs/vision/pathology/offline/classification/<name>.yaml:
# (monitor, EarlyStopping patience in validation checks or None, eva.core.models.LinearClassifier head, commit)
READ = {
    "bach": ("val/MulticlassAccuracy", None, True, LATEST),
    "bracs": ("val/MulticlassAccuracy", None, True, LATEST),
    "breakhis": ("val/MulticlassAccuracy", None, False, "630a7c9ebf7dd4f64f5a703b4f98f7a9ed2cad3a"),
    "crc": ("val/MulticlassAccuracy", None, True, LATEST),
    "gleason_arvaniti": ("val/MulticlassAccuracy", None, True, LATEST),
    "mhist": ("val/BinaryBalancedAccuracy", None, True, LATEST),
    "patch_camelyon": ("val/BinaryBalancedAccuracy", 9, True, LATEST),
    "unitopatho": ("val/MulticlassAccuracy", None, True, LATEST),
}


def test_table_is_what_evas_configs_say():
    assert {name: (t.monitor, t.patience, t.batch_norm, t.commit) for name, t in EVA_TASKS.items()} == READ
    # shared by every config read: max_steps, n_runs, batch size, AdamW lr (no weight decay given:
    # torch's 0.01), val_check_interval
    assert (EVA_MAX_STEPS, EVA_RUNS, EVA_BATCH_SIZE, EVA_LR, EVA_WEIGHT_DECAY, EVA_EVAL_EVERY) == (
        12_500, 5, 256, 3e-4, 0.01, 50
    )  # fmt: skip
    assert torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["weight_decay"] == EVA_WEIGHT_DECAY
    assert eva_task("Patch-Camelyon").source.endswith("patch_camelyon.yaml @ ad61be09")


def test_unknown_and_slide_level_datasets_are_named():
    with pytest.raises(EvaluationInputError, match=r"no patch-level classification config named 'kather'.*'bach'"):
        eva_task("kather")
    with pytest.raises(EvaluationInputError, match="slide level with an ABMIL head"):
        linear_probe(np.zeros((10, 4)), np.arange(10) % 2, dataset="panda_small")
    with pytest.raises(EvaluationInputError, match="patience must be a number of steps, None or 'eva'"):
        linear_probe(np.zeros((10, 4)), np.arange(10) % 2, patience="early")


def separable(n_per_class=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    x = rng.normal(size=(len(labels), dim)) + np.where(labels[:, None] == 1, 4.0, -4.0)
    return x.astype(np.float32), labels


def test_dataset_patience_stops_at_evas_validation_check():
    x, y = separable()
    split = np.array(["train", "train", "train", "val", "test"] * (len(y) // 5))
    run = dict(split=split, seeds=(0, 1), max_steps=1500)
    pcam = linear_probe(x, y, dataset="patch_camelyon", **run)
    # validation reaches 1.0, so no later check is strictly better: Lightning's EarlyStopping with
    # patience 9 stops at the 9th check after the best one, 9 x 50 steps later
    assert pcam.details["val_balanced_accuracy"] == [1.0, 1.0]
    assert pcam.details["steps_run"] == [step + 9 * 50 for step in pcam.details["best_step"]]
    assert pcam.details["protocol"]["patience_steps"] == 450
    # bach's config sets no EarlyStopping: every step runs, the best head is still the one kept
    bach = linear_probe(x, y, dataset="bach", **run)
    assert bach.details["steps_run"] == [1500, 1500]
    assert bach.details["best_step"] == pcam.details["best_step"]  # the same runs up to the stop
    assert bach.scores == pcam.scores
    own = linear_probe(x, y, **run)  # your own data: eva's shared protocol, no early stopping
    assert own.details["steps_run"] == [1500, 1500] and own.details["protocol"]["dataset"] is None
    explicit = linear_probe(x, y, dataset="patch_camelyon", patience=100, **run)  # steps, overriding eva
    assert explicit.details["steps_run"] == [step + 100 for step in explicit.details["best_step"]]


def test_head_is_evas_linear_classifier():
    torch.manual_seed(0)
    binary = _make_head(768, 2, batch_norm=True)
    norm, linear = binary
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine
    assert linear.out_features == 1  # one logit, BCEWithLogitsLoss, as eva's binary tasks
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05) and not linear.bias.any()
    assert _make_head(768, 4, batch_norm=True)[1].out_features == 4
    plain = _make_head(768, 4, batch_norm=False)
    assert isinstance(plain, torch.nn.Linear) and plain.bias.any()  # torch's own initialisation


def test_breakhis_uses_a_plain_linear_head_and_mean_std_is_reported():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 30)
    x = (rng.normal(size=(120, 8)) + 5 * np.eye(8)[labels]).astype(np.float32)
    result = linear_probe(x, labels, dataset="breakhis", seeds=(0, 1, 2), max_steps=300)
    assert result.details["protocol"]["batch_norm"] is False
    assert result.details["protocol"]["loss"] == "cross_entropy"
    assert result.std == pytest.approx(np.std(result.scores))
    assert str(result) == f"linear: {result.mean:.4f} ± {result.std:.4f} balanced accuracy over 3 run(s)"


def test_trailing_batch_of_one_is_skipped_by_the_batch_norm_head():
    x, y = separable(n_per_class=41)  # 82 samples; train split of 49 = 3 x 16 + 1
    split = np.array(["train"] * 49 + ["val"] * 17 + ["test"] * 16)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    result = linear_probe(x[order], y[order], split=split, batch_size=16, seeds=(0,), max_steps=40, eval_every=10)
    assert result.details["steps_run"] == [40]
