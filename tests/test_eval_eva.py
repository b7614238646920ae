"""The eva linear-probe protocol: the per-dataset tables as read from eva's configs, and the probe using them."""

from __future__ import annotations

import math

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
    EVA_MAIN_COMMIT,
    EVA_MAX_STEPS,
    EVA_RUNS,
    EVA_TRAIN_SIZES,
    EVA_V2_TASKS,
    EVA_WEIGHT_DECAY,
    PROTOCOLS,
    eva_main_patience,
)
from h0mini.eval.probe import _make_head  # noqa: E402

V2 = "ad61be09e4031a0dc3d2360f472c13a3cd6960a7"

# Transcribed by hand from eva main's offline configs (kaiko-ai/eva and its fork
# configs/vision/pathology/offline/classification/<name>.yaml; MedARC-AI/OpenMidnight eval_configs/):
# (monitor, EarlyStopping patience in validation checks, LinearClassifier head, repo, commit, path)
# eva main after kaiko-ai/eva#772: no val_check_interval (one check per epoch), nn.Linear, no schedule
OM, OM_PCAM = "5c59df713a714e482e2a96ca799a017508469b63", "8def847d7b19247b6fc1fd5f802329b00933e416"
READ_MAIN = {
    "bach": ("val/MulticlassAccuracy", 1250, False, "bogdandanciu/eva", "a5b6572d19838a7fdb1f6740768766812196fe94", None),
    "bracs": ("val/MulticlassAccuracy", 167, False, "MedARC-AI/OpenMidnight", OM, "eval_configs/bracs.yaml"),
    "breakhis": ("val/MulticlassAccuracy", 500, False, "kaiko-ai/eva", "0847bc080b63618c5b654007f0c264c999abae8f", None),
    "crc": ("val/MulticlassAccuracy", 7, False, "kaiko-ai/eva", "0fa9bce686ffacb8d761a590fec1381c277c2d20", None),
    "gleason_arvaniti": ("val/MulticlassAccuracy", 42, False, "MedARC-AI/OpenMidnight", OM, "eval_configs/gleason.yaml"),
    "mhist": ("val/BinaryBalancedAccuracy", 278, False, "MedARC-AI/OpenMidnight", OM, "eval_configs/mhist.yaml"),
    "patch_camelyon": ("val/BinaryBalancedAccuracy", 3, False, "MedARC-AI/OpenMidnight", OM_PCAM, "eval_configs/pcam.yaml"),
}
# Not read: no post-#772 unitopatho config is stored. Patience from #772's rule (below); monitor and
# head from the pre-#772 config kaiko-ai/eva @ 389f1510 (patience 45 there, the old 5%).
DERIVED_MAIN = {
    "unitopatho": ("val/MulticlassAccuracy", 100, False, "kaiko-ai/eva", "389f15109811ec75e6145c2d9a591f79ccc5b344", None),
}
# Train-split sizes in eva's dataset classes (kaiko-eva 0.4.5 sdist, src/eva/vision/data/datasets/
# classification/<name>.py), transcribed by hand
TRAIN_SIZES = {
    "bach": 268, "bracs": 3657, "breakhis": 1132, "crc": 100_000, "gleason_arvaniti": 15_303,
    "mhist": 2175, "patch_camelyon": 262_144, "unitopatho": 6270,
}  # fmt: skip
# the unmerged branch evaluation-protocol-v2 (val_check_interval 50)
READ_V2 = {
    "bach": ("val/MulticlassAccuracy", None, True, "kaiko-ai/eva", V2, None),
    "bracs": ("val/MulticlassAccuracy", None, True, "kaiko-ai/eva", V2, None),
    "breakhis": ("val/MulticlassAccuracy", None, False, "kaiko-ai/eva", "630a7c9ebf7dd4f64f5a703b4f98f7a9ed2cad3a", None),
    "crc": ("val/MulticlassAccuracy", None, True, "kaiko-ai/eva", V2, None),
    "gleason_arvaniti": ("val/MulticlassAccuracy", None, True, "kaiko-ai/eva", V2, None),
    "mhist": ("val/BinaryBalancedAccuracy", None, True, "kaiko-ai/eva", V2, None),
    "patch_camelyon": ("val/BinaryBalancedAccuracy", 9, True, "kaiko-ai/eva", V2, None),
    "unitopatho": ("val/MulticlassAccuracy", None, True, "kaiko-ai/eva", V2, None),
}


def _as_read(tasks):
    return {name: (t.monitor, t.patience, t.batch_norm, t.repo, t.commit, t.path) for name, t in tasks.items()}


def test_tables_are_what_evas_configs_say():
    assert _as_read(EVA_TASKS) == {**READ_MAIN, **DERIVED_MAIN}
    assert {name for name, t in EVA_TASKS.items() if t.derived} == set(DERIVED_MAIN)
    assert not any(t.derived for t in EVA_V2_TASKS.values())
    assert set(EVA_TASKS) == set(EVA_V2_TASKS)  # every patch-level config, under both protocols
    assert _as_read(EVA_V2_TASKS) == READ_V2
    assert {t.protocol for t in EVA_TASKS.values()} == {"main"}
    assert {t.protocol for t in EVA_V2_TASKS.values()} == {"evaluation-protocol-v2"}
    assert PROTOCOLS == ("main", "evaluation-protocol-v2") and EVA_MAIN_COMMIT == "c36237c7"
    # shared by every config read (both protocols): max_steps, n_runs, batch size, AdamW lr (no
    # weight decay given: torch's 0.01); v2 alone validates every 50 steps, main once per epoch
    assert (EVA_MAX_STEPS, EVA_RUNS, EVA_BATCH_SIZE, EVA_LR, EVA_WEIGHT_DECAY, EVA_EVAL_EVERY) == (
        12_500, 5, 256, 3e-4, 0.01, 50
    )  # fmt: skip
    assert torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["weight_decay"] == EVA_WEIGHT_DECAY
    assert eva_task("CRC").eval_every is None and eva_task("crc", "evaluation-protocol-v2").eval_every == 50
    assert eva_task("crc").source == (
        "kaiko-ai/eva configs/vision/pathology/offline/classification/crc.yaml @ 0fa9bce6"
    )
    assert eva_task("Patch-Camelyon", "evaluation-protocol-v2").source.endswith("patch_camelyon.yaml @ ad61be09")


def test_main_patience_is_20_percent_of_the_implied_epochs():
    # eva main's rule (kaiko-ai/eva#772): patience = 20% of the epochs 12,500 steps of 256 imply,
    # an epoch being ceil(n / 256) steps, rounded up. Written out by hand per dataset:
    #   bach 268 -> 2 batches, 6,250 epochs, 1,250        breakhis 1,132 -> 5, 2,500, 500
    #   crc 100,000 -> 391, 31.97, 6.39 -> 7             bracs 3,657 -> 15, 833.3, 166.7 -> 167
    #   gleason 15,303 -> 60, 208.3, 41.7 -> 42          mhist 2,175 -> 9, 1,388.9, 277.8 -> 278
    #   patch_camelyon 262,144 -> 1,024, 12.2, 2.44 -> 3  unitopatho 6,270 -> 25, 500, 100
    by_hand = {"bach": 1250, "breakhis": 500, "crc": 7, "bracs": 167, "gleason_arvaniti": 42, "mhist": 278,
               "patch_camelyon": 3, "unitopatho": 100}  # fmt: skip
    assert EVA_TRAIN_SIZES == TRAIN_SIZES
    for name, n in TRAIN_SIZES.items():
        assert eva_main_patience(n) == by_hand[name] == EVA_TASKS[name].patience, name
    # the rule agrees with every value read, so the one derived value rests on the same arithmetic
    assert all(eva_main_patience(TRAIN_SIZES[name]) == row[1] for name, row in READ_MAIN.items())
    # rounding matters only for crc among the read values: to nearest would give 6, not the 7 read
    assert round(0.2 * 12_500 / math.ceil(100_000 / 256)) == 6
    # pcam's epoch is ceil(262,144 / 256) = 1,024 steps exactly; a partial batch rounds the epoch up
    assert eva_main_patience(257, max_steps=100, batch_size=256) == 10  # 2 steps, 50 epochs, 10
    assert eva_main_patience(268, percent=5) == 313  # the pre-#772 5%: 312.5 rounded up
    with pytest.raises(EvaluationInputError, match="n_train must be >= 1, got 0"):
        eva_main_patience(0)


def test_derived_patience_is_labelled_in_the_source():
    task = eva_task("unitopatho")
    assert task.derived and task.patience == 100
    assert task.source.startswith("patience DERIVED (eva_main_patience(6270) = 100")
    assert task.source.endswith("unitopatho.yaml @ 389f1510")
    assert eva_task("bracs").source == "MedARC-AI/OpenMidnight eval_configs/bracs.yaml @ 5c59df71"
    assert not eva_task("bracs").derived


def test_unknown_and_slide_level_datasets_are_named():
    with pytest.raises(EvaluationInputError, match=r"no patch-level classification config named 'kather'.*'bach'"):
        eva_task("kather")
    with pytest.raises(EvaluationInputError, match="slide level with an ABMIL head"):
        linear_probe(np.zeros((10, 4)), np.arange(10) % 2, dataset="panda_small")
    with pytest.raises(EvaluationInputError, match=r"unknown eva protocol 'v3'.*'main'"):
        linear_probe(np.zeros((10, 4)), np.arange(10) % 2, protocol="v3")
    with pytest.raises(EvaluationInputError, match="patience must be a number of steps, None or 'eva'"):
        linear_probe(np.zeros((10, 4)), np.arange(10) % 2, patience="early")


def separable(n_per_class=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    x = rng.normal(size=(len(labels), dim)) + np.where(labels[:, None] == 1, 4.0, -4.0)
    return x.astype(np.float32), labels


SPLIT = np.array(["train", "train", "train", "val", "test"] * 24)  # 72 train, 24 val, 24 test


def test_default_is_eva_main_epoch_checks_and_patience_in_epochs():
    x, y = separable()
    # batches of 16: an epoch of the 72 training samples is 5 steps (4 x 16 + 8, the last kept);
    # lr 0.05 so that torch's initialisation of the plain head is overcome within the patience
    run = dict(split=SPLIT, seeds=(0, 1), max_steps=400, batch_size=16, lr=0.05)
    crc = linear_probe(x, y, dataset="crc", **run)
    protocol = crc.details["protocol"]
    assert protocol["protocol"] == "main" and protocol["batch_norm"] is False
    assert protocol["steps_per_epoch"] == 5 and protocol["eval_every"] == 5
    assert protocol["patience_steps"] == 7 * 5  # crc: 7 epochs without a strictly better check
    assert crc.details["val_balanced_accuracy"] == [1.0, 1.0]  # no later check can be strictly better
    assert all(step % 5 == 0 for step in crc.details["best_step"])  # checks fall on epoch ends
    assert crc.details["steps_run"] == [step + 35 for step in crc.details["best_step"]]
    # bach: 1,250 epochs of patience, more than 400 steps hold: every step runs, the best head is kept
    bach = linear_probe(x, y, dataset="bach", **run)
    assert bach.details["steps_run"] == [400, 400] and bach.details["protocol"]["patience_steps"] == 6250
    assert bach.details["best_step"] == crc.details["best_step"] and bach.scores == crc.scores
    # your own data: main's plain head and epoch checks, no early stopping
    own = linear_probe(x, y, split=SPLIT, seeds=(0,), max_steps=100, batch_size=16)
    assert own.details["steps_run"] == [100] and own.details["protocol"]["dataset"] is None
    assert own.details["protocol"]["batch_norm"] is False and own.details["protocol"]["eval_every"] == 5
    # at eva's batch of 256 the 72 samples are one step per epoch: a check after every step
    assert linear_probe(x, y, split=SPLIT, dataset="crc", seeds=(0,), max_steps=50).details["protocol"][
        "patience_steps"
    ] == 7  # fmt: skip


def test_partial_last_epoch_is_not_validated_as_in_lightning(monkeypatch):
    # Lightning (lightning/pytorch/loops/training_epoch_loop.py _should_check_val_fx, 2.2.0 and
    # 2.5.6): with val_check_interval unset, validation runs when (batch_idx + 1) is a multiple of
    # the epoch's batch count; max_steps ending an epoch early is not such a batch and does not set
    # should_stop, so fit ends without validating. 72 training samples in batches of 16 are 5 steps
    # an epoch: 23 steps are checked at 5, 10, 15 and 20 only, then the test split once.
    from h0mini.eval import probe

    calls = []
    real = probe.balanced_accuracy
    monkeypatch.setattr(probe, "balanced_accuracy", lambda t, p: calls.append(len(t)) or real(t, p))
    x, y = separable()
    result = linear_probe(x, y, split=SPLIT, seeds=(0,), max_steps=23, batch_size=16, lr=0.05)
    assert result.details["steps_run"] == [23]
    assert calls == [24, 24, 24, 24, 24]  # 4 validation checks (24 val samples), 1 test; none at step 23
    assert result.details["best_step"][0] in (5, 10, 15, 20)
    # under v2 (check_val_every_n_epoch: null) Lightning counts the 50 steps over the whole run
    calls.clear()
    linear_probe(x, y, split=SPLIT, seeds=(0,), max_steps=149, protocol="evaluation-protocol-v2")
    assert len(calls) == 2 + 1  # checks at 50 and 100, not at 149
    # a run too short for one check would select nothing: named, with the fix
    with pytest.raises(EvaluationInputError, match=r"max_steps \(4\) ends before the first validation check "
                       r"\(every 5 steps, once per epoch\).*max_steps >= 5"):  # fmt: skip
        linear_probe(x, y, split=SPLIT, seeds=(0,), max_steps=4, batch_size=16)


def test_v2_is_still_selectable_by_name():
    x, y = separable()
    v2 = "evaluation-protocol-v2"
    run = dict(split=SPLIT, seeds=(0, 1), max_steps=1500, protocol=v2)
    pcam = linear_probe(x, y, dataset="patch_camelyon", **run)
    # validation reaches 1.0, so no later check is strictly better: Lightning's EarlyStopping with
    # patience 9 stops at the 9th check after the best one, 9 x 50 steps later
    assert pcam.details["val_balanced_accuracy"] == [1.0, 1.0]
    assert pcam.details["steps_run"] == [step + 9 * 50 for step in pcam.details["best_step"]]
    assert pcam.details["protocol"]["patience_steps"] == 450 and pcam.details["protocol"]["batch_norm"] is True
    assert pcam.details["protocol"]["protocol"] == v2 and pcam.details["protocol"]["eval_every"] == 50
    # bach's v2 config sets no EarlyStopping: every step runs, the best head is still the one kept
    bach = linear_probe(x, y, dataset="bach", **run)
    assert bach.details["steps_run"] == [1500, 1500]
    assert bach.details["best_step"] == pcam.details["best_step"]  # the same runs up to the stop
    assert bach.scores == pcam.scores
    own = linear_probe(x, y, **run)  # your own data under v2: LinearClassifier, no early stopping
    assert own.details["steps_run"] == [1500, 1500] and own.details["protocol"]["batch_norm"] is True
    explicit = linear_probe(x, y, dataset="patch_camelyon", patience=100, **run)  # steps, overriding eva
    assert explicit.details["steps_run"] == [step + 100 for step in explicit.details["best_step"]]


def test_heads_main_linear_and_v2_linear_classifier():
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
    for protocol in PROTOCOLS:
        result = linear_probe(x, labels, dataset="breakhis", protocol=protocol, seeds=(0, 1, 2), max_steps=300)
        assert result.details["protocol"]["batch_norm"] is False
        assert result.details["protocol"]["loss"] == "cross_entropy"
        assert result.std == pytest.approx(np.std(result.scores))
        assert str(result) == f"linear: {result.mean:.4f} ± {result.std:.4f} balanced accuracy over 3 run(s)"


def test_trailing_batch_of_one_is_skipped_by_the_batch_norm_head():
    x, y = separable(n_per_class=41)  # 82 samples; train split of 49 = 3 x 16 + 1
    split = np.array(["train"] * 49 + ["val"] * 17 + ["test"] * 16)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    result = linear_probe(
        x[order], y[order], split=split, batch_size=16, seeds=(0,), max_steps=40, eval_every=10,
        protocol="evaluation-protocol-v2",
    )  # fmt: skip
    assert result.details["steps_run"] == [40]
    assert result.details["protocol"]["steps_per_epoch"] == 3  # 48 of the 49 per epoch
