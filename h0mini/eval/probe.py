"""Linear probing, kNN and logistic-regression baselines, and the robustness index (RI).

The linear probe follows kaiko's eva protocol for frozen embeddings (``h0mini.eval.eva`` has the
figures and their sources). By default (``protocol="main"``) it is eva's main branch after
kaiko-ai/eva#772: a plain ``nn.Linear`` head, one logit with ``BCEWithLogitsLoss`` for two classes
and cross-entropy otherwise, AdamW at lr 3e-4 with torch's weight decay (0.01) and no schedule,
batches of 256 drawn from shuffled epochs, 12,500 steps, validation balanced accuracy after every
epoch with the best head kept, and 5 seeds whose test scores are reported as mean ± std
(``ddof=0``). ``dataset="bach"`` (or another of eva's eight patch-level configs) adds that
config's early stopping: its patience in epochs, that is ``patience * ceil(n_train / 256)`` steps.
As in Lightning (``training_epoch_loop.py`` ``_should_check_val_fx``, lightning 2.2.0 and 2.5.6),
a trailing partial epoch cut by ``max_steps`` is not validated: the best head is the best of the
epoch-end checks. ``protocol=
"evaluation-protocol-v2"`` is eva's unmerged branch of that name: the ``LinearClassifier`` head
(non-affine batch norm first), validation every 50 steps, early stopping only for patch_camelyon.
Without ``dataset`` no early stopping happens. ``QUICK_PROBE`` (2,000 steps, patience 400) is a
named shortcut for smoke tests; its numbers are not eva's.

On CPU the head trains with one intra-op thread for the duration of the call (restored
afterwards): a linear head on cached embeddings is bound by per-operation overhead, and more
threads only add synchronisation (measured 30x slower with 2 threads on a busy 2-core machine).

Balanced accuracy is the mean recall over the classes present in the true labels
(scikit-learn's ``balanced_accuracy_score``).

The robustness index is PathoROB's (Kömen et al. 2025, "Towards robust foundation models for
digital pathology", github.com/bifold-pathomics/PathoROB): over each sample's k nearest
neighbours (cosine), with neighbours from the same slide excluded as PathoROB always does, count
SO (same biological label, other centre) and OS (other label, same centre);
``RI = sum SO / (sum SO + sum OS)``. Above 0.5, biology dominates the embedding; below, the
centre (stain, scanner, site) does. ``de_jong_ratio`` is de Jong et al.'s earlier ratio
``(SS + SO) / (SS + OS)`` over the same neighbours. Neighbours are ranked in float64 and a tie
goes to the lower sample index.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import EvaluationInputError
from .common import import_optional, resolve_device
from .eva import (
    EVA_BATCH_SIZE,
    EVA_EVAL_EVERY,
    EVA_LR,
    EVA_MAX_STEPS,
    EVA_RUNS,
    EVA_WEIGHT_DECAY,
    MAIN,
    V2,
    EvaTask,
    check_protocol,
    eva_task,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

QUICK_PROBE = {"max_steps": 2_000, "patience": 400}
"""A short budget for smoke tests (``linear_probe(..., **QUICK_PROBE)``); not eva's numbers."""

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Any]]


@dataclass
class ProbeResult:
    """Test balanced accuracy of one probing method over one or more runs."""

    method: str
    mean: float
    std: float
    scores: List[float]
    details: Dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.method}: {self.mean:.4f} ± {self.std:.4f} balanced accuracy over {len(self.scores)} run(s)"

    def as_row(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "balanced_accuracy_mean": self.mean,
            "balanced_accuracy_std": self.std,
            "n_runs": len(self.scores),
        }


@dataclass
class RobustnessIndex:
    """``ri = so / (so + os)`` over ``n`` samples and ``k`` neighbours each."""

    ri: float
    so: int
    os: int
    k: int
    n: int


# --------------------------------------------------------------------------------------------
# Inputs


def _embeddings(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    array = np.asarray(x)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise EvaluationInputError(f"embeddings must be a non-empty 2-D array (samples, dim), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise EvaluationInputError(f"embeddings must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise EvaluationInputError(
            f"embeddings have NaN or inf values in {int(bad.any(axis=1).sum())} row(s), first at row {row}, dimension {col}"
        )
    return array


def _vector(x: Optional[ArrayLike], n: int, field_name: str) -> Optional[np.ndarray]:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.ndim != 1 or len(array) != n:
        raise EvaluationInputError(f"{field_name} must be 1-D with one entry per embedding ({n}), got shape {array.shape}")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise EvaluationInputError(f"{field_name} has NaN entries, first at row {int(np.argwhere(np.isnan(array))[0][0])}")
    return array


def encode_labels(labels: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """``(classes, codes)``: the sorted distinct labels and each label's index into them."""
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    return classes, codes.astype(np.int64)


def make_split(
    labels: ArrayLike,
    *,
    groups: Optional[ArrayLike] = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """A train/val/test assignment: stratified by label, or by group (slide, patient) when given.

    With ``groups`` every group lands wholly in one split, so that no slide leaks between
    training and testing (scikit-learn ``GroupShuffleSplit``; fractions then count groups).

    Returns:
        Array of ``"train"``/``"val"``/``"test"`` strings, one per sample. A warning names any
        class left out of a split (classes of one or two samples, or a group split).

    Raises:
        EvaluationInputError (a ValueError): fractions out of range, or too few samples or groups to split.
    """
    model_selection = import_optional("scikit-learn", "probe splits").model_selection
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise EvaluationInputError(
            f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction}, {test_fraction}"
        )
    labels = np.asarray(labels)
    n = len(labels)
    index = np.arange(n)
    split = np.full(n, "train", dtype=object)
    classes, counts = np.unique(labels, return_counts=True)
    if groups is not None:
        groups = _vector(groups, n, "groups")
        n_groups = len(np.unique(groups))
        if n_groups < 3:
            raise EvaluationInputError(f"a group-aware split needs at least 3 groups, got {n_groups}")
        outer = model_selection.GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        rest, test = next(outer.split(index, groups=groups))
        inner = model_selection.GroupShuffleSplit(
            n_splits=1, test_size=val_fraction / (1 - test_fraction), random_state=seed + 1
        )
        _, val = next(inner.split(rest, groups=groups[rest]))
        split[index[test]] = "test"
        split[rest[val]] = "val"
        return _warn_missing_classes(split.astype(str), labels, classes, counts)
    stratify = labels if counts.min() >= 3 else None
    if stratify is None:
        logger.warning("some class has fewer than 3 samples; the split is not stratified")
    try:
        rest, test = model_selection.train_test_split(index, test_size=test_fraction, random_state=seed, stratify=stratify)
        _, val = model_selection.train_test_split(
            rest,
            test_size=val_fraction / (1 - test_fraction),
            random_state=seed + 1,
            stratify=None if stratify is None else labels[rest],
        )
    except ValueError as error:  # scikit-learn: a split smaller than the number of classes, or empty
        raise EvaluationInputError(
            f"cannot split {n} samples of {len(classes)} classes with test_fraction={test_fraction} and "
            f"val_fraction={val_fraction}: each split needs at least one sample per class ({error}). Class counts: "
            f"{_class_counts(classes, counts)}. Use more samples per class, larger fractions, or pass split= yourself"
        ) from None
    split[test] = "test"
    split[val] = "val"
    return _warn_missing_classes(split.astype(str), labels, classes, counts)


def _class_counts(classes: np.ndarray, counts: np.ndarray, limit: int = 20) -> str:
    """``{class: count}`` of the smallest classes (the ones a split runs short of), at most ``limit``."""
    order = np.argsort(counts, kind="stable")[:limit]
    shown = {classes[i].item() if hasattr(classes[i], "item") else classes[i]: int(counts[i]) for i in order}
    return f"{shown}" + (f" and {len(classes) - limit} larger classes" if len(classes) > limit else "")


def _warn_missing_classes(split: np.ndarray, labels: np.ndarray, classes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Warn about classes absent from a split: their test recall, or their early stopping, is then missing."""
    for cls, count in zip(classes, counts):
        missing = [part for part in SPLITS if not (labels[split == part] == cls).any()]
        if missing:
            warnings.warn(
                f"class {cls.item() if hasattr(cls, 'item') else cls!r} ({int(count)} samples) has no sample in "
                f"split(s) {missing}: balanced accuracy there leaves it out"
                + (" and no probe learns it" if "train" in missing else "")
                + ". Add samples of it or pass split= yourself",
                UserWarning,
                stacklevel=3,
            )
    return split


def _resolve_split(
    labels: np.ndarray, split: Optional[ArrayLike], groups: Optional[ArrayLike], need_val: bool, seed: int
) -> np.ndarray:
    if split is None:
        return make_split(labels, groups=groups, seed=seed)
    split = _vector(split, len(labels), "split").astype(str)
    unknown = sorted(set(split) - set(SPLITS))
    if unknown:
        raise EvaluationInputError(f"split has unknown values {unknown}; use 'train', 'val' and 'test'")
    needed = ("train", "val", "test") if need_val else ("train", "test")
    empty = [s for s in needed if not (split == s).any()]
    if empty:
        raise EvaluationInputError(f"split has no {' and no '.join(repr(s) for s in empty)} samples" + (
            " (the linear probe early-stops on 'val')" if "val" in empty else ""
        ))
    return split


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean per-class recall over the classes in ``y_true`` (scikit-learn's definition)."""
    metrics = import_optional("scikit-learn", "balanced accuracy").metrics
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(metrics.balanced_accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


# --------------------------------------------------------------------------------------------
# Linear probe (eva)


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make_head(dim: int, n_classes: int, batch_norm: bool) -> torch.nn.Module:
    """eva's head: one logit for two classes, else one per class; with ``batch_norm``, eva's
    ``LinearClassifier`` (non-affine batch norm, weights N(0, 0.01), zero bias), else ``nn.Linear``."""
    linear = torch.nn.Linear(dim, 1 if n_classes == 2 else n_classes)
    if not batch_norm:
        return linear
    torch.nn.init.normal_(linear.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(linear.bias)
    return torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False), linear)


def _epoch_size(n_train: int, batch_size: int, batch_norm: bool) -> int:
    """Samples drawn per epoch. Batch norm cannot train on one sample: an epoch's trailing batch of
    one is left out (it is drawn again, elsewhere in the order, in the next epoch)."""
    return n_train - 1 if batch_norm and n_train % batch_size == 1 else n_train


@dataclass
class _Run:
    test: float
    best_val: float
    best_step: int
    steps_run: int


def _train_head(
    x: Dict[str, torch.Tensor],
    y: Dict[str, torch.Tensor],
    n_classes: int,
    *,
    seed: int,
    max_steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    eval_every: int,
    patience: Optional[int],
    batch_norm: bool,
) -> _Run:
    """Train one head; keep the one with the best validation balanced accuracy (ties: the earliest)."""
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the head's initialisation
    try:
        head = _make_head(x["train"].shape[1], n_classes, batch_norm).to(x["train"].device)
    finally:
        torch.random.set_rng_state(torch_state)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    binary = n_classes == 2
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.CrossEntropyLoss()
    targets = y["train"].float() if binary else y["train"]
    n_train = x["train"].shape[0]
    epoch_size = _epoch_size(n_train, batch_size, batch_norm)
    truth = {split: y[split].cpu().numpy() for split in ("val", "test")}

    def logits(batch: torch.Tensor) -> torch.Tensor:
        out = head(batch)
        return out[:, 0] if binary else out

    def evaluate(split: str) -> float:
        with torch.no_grad():
            out = logits(x[split])
            predicted = (out > 0).long() if binary else out.argmax(dim=1)
        return balanced_accuracy(truth[split], predicted.cpu().numpy())

    best_score, best_step, best_state = -math.inf, 0, copy.deepcopy(head.state_dict())
    order = torch.randperm(n_train, generator=generator)
    position, step = 0, 0
    for step in range(1, max_steps + 1):
        if position >= epoch_size:
            order, position = torch.randperm(n_train, generator=generator), 0
        batch = order[position : min(position + batch_size, epoch_size)].to(x["train"].device)
        position += batch_size
        head.train()
        loss = loss_fn(logits(x["train"][batch]), targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Lightning checks at every eval_every-th step only (epoch ends for main; every 50 steps counted
        # over the whole run for v2, whose configs set check_val_every_n_epoch: null), never because
        # max_steps was reached: fit stops there without validating (lightning/pytorch/loops/
        # training_epoch_loop.py _should_check_val_fx and fit_loop.py done, 2.2.0 and 2.5.6).
        if step % eval_every == 0:
            head.eval()
            score = evaluate("val")
            if score > best_score:
                best_score, best_step, best_state = score, step, copy.deepcopy(head.state_dict())
            elif patience is not None and step - best_step >= patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return _Run(evaluate("test"), best_score, best_step, step)


def _protocol(
    dataset: Optional[str], patience: Union[int, None, str], batch_norm: Optional[bool], protocol: str
) -> Tuple[Optional[EvaTask], Union[int, None, str], bool]:
    """The eva task, the patience (steps, None, or "eva": the task's, in validation checks) and the head."""
    check_protocol(protocol)
    task = None if dataset is None else eva_task(dataset, protocol)
    if isinstance(patience, str):
        if patience != "eva":
            raise EvaluationInputError(f"patience must be a number of steps, None or 'eva', got {patience!r}")
        if task is None or task.patience is None:
            patience = None
    elif patience is not None:
        if int(patience) < 1:
            raise EvaluationInputError(f"patience must be >= 1 step (or None: no early stopping), got {patience}")
        patience = int(patience)
    if batch_norm is None:
        batch_norm = protocol == V2 if task is None else task.batch_norm
    return task, patience, bool(batch_norm)


def linear_probe(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    split: Optional[ArrayLike] = None,
    groups: Optional[ArrayLike] = None,
    dataset: Optional[str] = None,
    protocol: str = MAIN,
    seeds: Sequence[int] = tuple(range(EVA_RUNS)),
    max_steps: int = EVA_MAX_STEPS,
    batch_size: int = EVA_BATCH_SIZE,
    lr: float = EVA_LR,
    weight_decay: float = EVA_WEIGHT_DECAY,
    eval_every: Optional[int] = None,
    patience: Union[int, None, str] = "eva",
    batch_norm: Optional[bool] = None,
    device: Union[str, torch.device, None] = None,
) -> ProbeResult:
    """Train a linear head on frozen embeddings with eva's protocol, over several seeds.

    Args:
        embeddings: ``(N, D)`` features.
        labels: ``N`` class labels (any hashable values).
        split: ``N`` values ``"train"``/``"val"``/``"test"``. Default: a 60/20/20 split, stratified by
            label, or by ``groups`` when given.
        groups: ``N`` group ids (slide, patient) kept within one split when the split is made here.
        dataset: an eva config name to apply what that config sets on top of the shared protocol
            (its patience and head; ``h0mini.eval.eva``): ``"bach"``, ``"bracs"``, ``"breakhis"``,
            ``"crc"``, ``"gleason_arvaniti"``, ``"mhist"``, ``"patch_camelyon"``, ``"unitopatho"``
            (under eva main unitopatho's patience is derived from #772's rule, not read; see
            ``h0mini.eval.eva``). ``None`` (your own data): the shared protocol, no early stopping.
        protocol: ``"main"`` (default; eva's main branch after kaiko-ai/eva#772) or
            ``"evaluation-protocol-v2"`` (eva's unmerged branch, ad61be09).
        seeds: one run per seed (initialisation and batch order). Default: 5 runs, as eva.
        max_steps: optimiser steps per run. Default 12,500 (eva); ``QUICK_PROBE`` has a short setting.
        batch_size, lr, weight_decay: AdamW settings. Defaults: eva's 256, 3e-4 and 0.01.
        eval_every: steps between validation checks. Default: the protocol's, once per epoch
            (``ceil(epoch samples / batch_size)`` steps) for main, 50 for evaluation-protocol-v2.
        patience: stop after this many steps without a strictly better validation balanced
            accuracy; ``None`` never stops early; ``"eva"`` (default) takes the dataset's eva
            patience (validation checks, i.e. epochs for main, times the steps between checks),
            or none without a dataset.
        batch_norm: eva's ``LinearClassifier`` head (batch norm first) or a plain ``nn.Linear``.
            Default: as the dataset's config; without one, ``nn.Linear`` for main and
            ``LinearClassifier`` for evaluation-protocol-v2.
        device: torch device, or ``"auto"`` (CUDA when available). Default: CPU.

    Returns:
        ``ProbeResult`` with the test balanced accuracy mean and std (``ddof=0``) over seeds
        (``str()`` prints ``mean ± std``), and in ``details`` the per-seed best validation scores,
        best and last steps, and the protocol used.

    Raises:
        EvaluationInputError (a ValueError): mismatched lengths, NaN embeddings, an empty split, an
            unknown dataset or bad settings (``max_steps`` shorter than one validation interval).
    """
    x_all = _embeddings(embeddings)
    n = len(x_all)
    labels = _vector(labels, n, "labels")
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if value is not None and int(value) < 1:
            raise EvaluationInputError(f"{name} must be >= 1, got {value}")
    if not seeds:
        raise EvaluationInputError("seeds must name at least one seed")
    task, patience, batch_norm = _protocol(dataset, patience, batch_norm, protocol)
    classes, codes = encode_labels(labels)
    if len(classes) < 2:
        raise EvaluationInputError(f"labels must have at least 2 classes, got {classes.tolist()}")
    split = _resolve_split(labels, split, groups, need_val=True, seed=int(seeds[0]))
    if batch_norm and (split == "train").sum() < 2:
        raise EvaluationInputError("the batch-norm head needs at least 2 training samples; pass batch_norm=False")
    epoch_size = _epoch_size(int((split == "train").sum()), int(batch_size), batch_norm)
    steps_per_epoch = math.ceil(epoch_size / int(batch_size))
    if eval_every is None:
        eval_every = steps_per_epoch if protocol == MAIN else EVA_EVAL_EVERY
    eval_every = int(eval_every)
    if int(max_steps) < eval_every:
        raise EvaluationInputError(
            f"max_steps ({int(max_steps)}) ends before the first validation check (every {eval_every} steps"
            + (", once per epoch" if protocol == MAIN and eval_every == steps_per_epoch else "")
            + "), so no head would ever be selected; pass max_steps >= "
            f"{eval_every} or a smaller eval_every"
        )
    patience_steps = task.patience * eval_every if patience == "eva" else patience
    device = resolve_device(device)
    x = {s: torch.from_numpy(x_all[split == s]).to(device) for s in SPLITS}
    y = {s: torch.from_numpy(codes[split == s]).to(device) for s in SPLITS}
    runs = []
    for seed in seeds:
        with _single_thread(device):
            run = _train_head(
                x, y, len(classes), seed=int(seed), max_steps=int(max_steps), batch_size=int(batch_size),
                lr=lr, weight_decay=weight_decay, eval_every=eval_every, patience=patience_steps,
                batch_norm=batch_norm,
            )  # fmt: skip
        runs.append(run)
        logger.info(
            "linear probe seed %s: val %.4f at step %d of %d, test %.4f",
            seed, run.best_val, run.best_step, run.steps_run, run.test,
        )  # fmt: skip
    scores = [run.test for run in runs]
    protocol = {
        "protocol": protocol,
        "dataset": None if task is None else task.name,
        "source": None if task is None else task.source,
        "max_steps": int(max_steps),
        "batch_size": int(batch_size),
        "lr": lr,
        "weight_decay": weight_decay,
        "eval_every": eval_every,
        "steps_per_epoch": steps_per_epoch,
        "patience_steps": patience_steps,
        "batch_norm": batch_norm,
        "loss": "bce_with_logits" if len(classes) == 2 else "cross_entropy",
    }
    return ProbeResult(
        "linear",
        float(np.mean(scores)),
        float(np.std(scores)),
        scores,
        {
            "val_balanced_accuracy": [run.best_val for run in runs],
            "best_step": [run.best_step for run in runs],
            "steps_run": [run.steps_run for run in runs],
            "classes": classes.tolist(),
            "protocol": protocol,
        },
    )


# --------------------------------------------------------------------------------------------
# Baselines


def knn_probe(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    split: Optional[ArrayLike] = None,
    groups: Optional[ArrayLike] = None,
    k: int = 20,
    seed: int = 0,
) -> ProbeResult:
    """k-nearest-neighbour classifier (cosine distance, majority vote) fit on train, scored on test.

    ``"val"`` samples, if any, are not used. Default ``k = 20`` (the DINO kNN protocol), capped
    at the number of training samples.

    Returns:
        ``ProbeResult`` with one run.
    """
    neighbors = import_optional("scikit-learn", "kNN probe").neighbors
    x = _embeddings(embeddings)
    labels = _vector(labels, len(x), "labels")
    split = _resolve_split(labels, split, groups, need_val=False, seed=seed)
    train, test = split == "train", split == "test"
    k_used = min(int(k), int(train.sum()))
    if k_used < 1:
        raise EvaluationInputError(f"k must be >= 1, got {k}")
    classifier = neighbors.KNeighborsClassifier(n_neighbors=k_used, metric="cosine", algorithm="brute")
    classifier.fit(x[train], labels[train])
    score = balanced_accuracy(labels[test], classifier.predict(x[test]))
    return ProbeResult("knn", score, 0.0, [score], {"k": k_used})


def logistic_probe(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    split: Optional[ArrayLike] = None,
    groups: Optional[ArrayLike] = None,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> ProbeResult:
    """Standardised features + L2 logistic regression (scikit-learn, lbfgs), fit on train, scored on test.

    Returns:
        ``ProbeResult`` with one run.
    """
    sklearn = import_optional("scikit-learn", "logistic-regression probe")
    import sklearn.linear_model  # noqa: F401
    import sklearn.pipeline  # noqa: F401
    import sklearn.preprocessing  # noqa: F401

    x = _embeddings(embeddings)
    labels = _vector(labels, len(x), "labels")
    split = _resolve_split(labels, split, groups, need_val=False, seed=seed)
    train, test = split == "train", split == "test"
    if len(np.unique(labels[train])) < 2:
        raise EvaluationInputError("the training split has a single class; logistic regression needs two or more")
    classifier = sklearn.pipeline.make_pipeline(
        sklearn.preprocessing.StandardScaler(),
        sklearn.linear_model.LogisticRegression(C=C, max_iter=max_iter, random_state=seed),
    )
    classifier.fit(x[train], labels[train])
    score = balanced_accuracy(labels[test], classifier.predict(x[test]))
    return ProbeResult("logistic_regression", score, 0.0, [score], {"C": C})


def run_probes(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    split: Optional[ArrayLike] = None,
    groups: Optional[ArrayLike] = None,
    dataset: Optional[str] = None,
    protocol: str = MAIN,
    seeds: Sequence[int] = tuple(range(EVA_RUNS)),
    max_steps: int = EVA_MAX_STEPS,
    patience: Union[int, None, str] = "eva",
    knn_k: int = 20,
    device: Union[str, torch.device, None] = None,
) -> Any:
    """Linear probe (``linear_probe``: eva's protocol, ``dataset`` and ``protocol`` as there), kNN and logistic
    regression on one shared split.

    Returns:
        A pandas DataFrame with columns ``method``, ``balanced_accuracy_mean``,
        ``balanced_accuracy_std``, ``n_runs``.
    """
    pd = import_optional("pandas", "probe tables")
    x = _embeddings(embeddings)
    labels = _vector(labels, len(x), "labels")
    split = _resolve_split(labels, split, groups, need_val=True, seed=int(seeds[0]) if seeds else 0)
    results = [
        linear_probe(
            x, labels, split=split, dataset=dataset, protocol=protocol, seeds=seeds, max_steps=max_steps,
            patience=patience, device=device,
        ),
        knn_probe(x, labels, split=split, k=knn_k),
        logistic_probe(x, labels, split=split),
    ]
    return pd.DataFrame([r.as_row() for r in results])


# --------------------------------------------------------------------------------------------
# Robustness index


@dataclass
class NeighbourCounts:
    """Over ``n`` samples' ``k`` nearest neighbours from other slides: how many share label and/or centre."""

    ss: int  # same label, same centre
    so: int  # same label, other centre
    os: int  # other label, same centre
    oo: int  # other label, other centre
    k: int
    n: int


def neighbour_counts(
    embeddings: ArrayLike,
    labels: ArrayLike,
    centres: ArrayLike,
    *,
    slides: Optional[ArrayLike],
    k: int = 10,
    chunk_size: int = 1024,
    device: Union[str, torch.device, None] = None,
) -> NeighbourCounts:
    """Count SS/SO/OS/OO over each sample's ``k`` nearest neighbours (cosine, float64), other slides only.

    Without ``slides`` only the sample itself is excluded, and a warning says so: PathoROB always
    excludes the sample's own slide, whose tiles trivially share its label and centre.

    Raises:
        EvaluationInputError (a ValueError): mismatched lengths, NaN or zero embeddings, a single
            centre, or fewer than ``k`` neighbours outside some sample's slide.
    """
    x = _embeddings(embeddings)
    n = len(x)
    labels = _vector(labels, n, "labels")
    centres = _vector(centres, n, "centres")
    slides = _vector(slides, n, "slides")
    if k < 1:
        raise EvaluationInputError(f"k must be >= 1, got {k}")
    if slides is None:
        warnings.warn(
            "robustness_index without slides= excludes only each sample itself from its neighbours; PathoROB "
            "excludes every sample of the same slide (they share label and centre trivially and inflate SS), so "
            "this RI is not PathoROB's. Pass slides= (one slide id per sample)",
            UserWarning,
            stacklevel=3,
        )
    device = resolve_device(device)
    _, label_codes = encode_labels(labels)
    _, centre_codes = encode_labels(centres)
    slide_codes = encode_labels(slides)[1] if slides is not None else np.arange(n)
    if len(np.unique(centre_codes)) < 2:
        raise EvaluationInputError("centres has a single value: the robustness index needs at least two centres")
    features = torch.from_numpy(x.astype(np.float64)).to(device)
    norms = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    if (norms == 0).any():
        raise EvaluationInputError(f"embedding row {int((norms[:, 0] == 0).nonzero()[0, 0])} is all zeros; cosine is undefined")
    unit = features / norms
    lab = torch.from_numpy(label_codes).to(device)
    cen = torch.from_numpy(centre_codes).to(device)
    sli = torch.from_numpy(slide_codes).to(device)
    counts = {"ss": 0, "so": 0, "os": 0, "oo": 0}
    with torch.inference_mode():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sims = unit[start:stop] @ unit.T
            same_slide = sli[start:stop, None] == sli[None, :]
            eligible = (~same_slide).sum(dim=1)
            if int(eligible.min()) < k:
                row = start + int(eligible.argmin())
                raise EvaluationInputError(
                    f"sample {row} has only {int(eligible.min())} neighbours outside its slide; lower k (now {k})"
                )
            sims.masked_fill_(same_slide, -math.inf)
            # stable descending sort: equal similarities keep index order, so a tie goes to the lower index
            neighbours = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
            same_label = lab[neighbours] == lab[start:stop, None]
            same_centre = cen[neighbours] == cen[start:stop, None]
            counts["ss"] += int((same_label & same_centre).sum())
            counts["so"] += int((same_label & ~same_centre).sum())
            counts["os"] += int((~same_label & same_centre).sum())
            counts["oo"] += int((~same_label & ~same_centre).sum())
    return NeighbourCounts(**counts, k=int(k), n=n)


def _ratio(numerator: int, denominator: int, what: str) -> float:
    if denominator == 0:
        warnings.warn(
            f"{what} is undefined (0/0): no neighbour falls in its denominator; it is NaN, as in PathoROB. "
            f"Check labels and centres",
            UserWarning,
            stacklevel=3,
        )
        return math.nan
    return numerator / denominator


def robustness_index(
    embeddings: ArrayLike,
    labels: ArrayLike,
    centres: ArrayLike,
    *,
    slides: Optional[ArrayLike] = None,
    k: int = 10,
    chunk_size: int = 1024,
    device: Union[str, torch.device, None] = None,
) -> RobustnessIndex:
    """PathoROB's robustness index (Kömen et al. 2025): do neighbours share biology or centre?

    Args:
        embeddings: ``(N, D)`` features.
        labels: ``N`` biological labels (tissue class, cancer type).
        centres: ``N`` centre ids (hospital, stain protocol, scanner).
        slides: ``N`` slide ids; neighbours from the same slide are excluded, as in PathoROB.
            Without them only the sample itself is excluded, with a warning (not PathoROB's RI).
        k: neighbours per sample (cosine similarity, ranked in float64; a tie goes to the lower index).
        chunk_size: rows per similarity block.
        device: torch device, or ``"auto"`` (CUDA when available). Default: CPU.

    Returns:
        ``RobustnessIndex(ri, so, os, k, n)``; ``ri`` in [0, 1], above 0.5 biology dominates; NaN
        (with a warning) when no neighbour is SO or OS, as PathoROB gives.

    Raises:
        EvaluationInputError (a ValueError): mismatched lengths, NaN or zero embeddings, a single
            centre, or fewer than ``k`` eligible neighbours for some sample.
    """
    counts = neighbour_counts(embeddings, labels, centres, slides=slides, k=k, chunk_size=chunk_size, device=device)
    ri = _ratio(counts.so, counts.so + counts.os, "the robustness index SO / (SO + OS)")
    return RobustnessIndex(ri=ri, so=counts.so, os=counts.os, k=counts.k, n=counts.n)


def de_jong_ratio(
    embeddings: ArrayLike,
    labels: ArrayLike,
    centres: ArrayLike,
    *,
    slides: Optional[ArrayLike] = None,
    k: int = 10,
    chunk_size: int = 1024,
    device: Union[str, torch.device, None] = None,
) -> float:
    """de Jong et al.'s ratio ``(SS + SO) / (SS + OS)`` over the same neighbours as ``robustness_index``.

    Above 1, neighbours share the biological label more often than the centre.

    Returns:
        The ratio; NaN with a warning when ``SS + OS`` is 0.
    """
    counts = neighbour_counts(embeddings, labels, centres, slides=slides, k=k, chunk_size=chunk_size, device=device)
    return _ratio(counts.ss + counts.so, counts.ss + counts.os, "de Jong et al.'s ratio (SS + SO) / (SS + OS)")


__all__ = [
    "QUICK_PROBE",
    "ProbeResult",
    "de_jong_ratio",
    "RobustnessIndex",
    "balanced_accuracy",
    "encode_labels",
    "knn_probe",
    "linear_probe",
    "logistic_probe",
    "make_split",
    "neighbour_counts",
    "robustness_index",
    "run_probes",
]
