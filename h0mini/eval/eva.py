"""kaiko's eva linear-probe protocol for patch-level classification, as its configs set it.

Two generations of eva's ``configs/vision/pathology/offline/classification/<dataset>.yaml`` are
available by name (``linear_probe(protocol=...)``):

``"main"`` (the default): eva's main branch after kaiko-ai/eva#772 (merged 2025-03, "Increase
patience to 20%"; the issue names its merge commit c36237c7). The configs read set:

* head ``torch.nn.Linear`` (torch's own initialisation; one logit with ``BCEWithLogitsLoss`` for
  binary tasks, else cross-entropy);
* ``torch.optim.AdamW`` with ``lr`` 3e-4 and no other argument (so torch's weight decay, 0.01);
  no ``lr_scheduler`` key (#772 removed the cosine schedule);
* ``max_steps`` 12,500, ``n_runs`` 5, train batch size 256 (shuffled, the last batch kept);
* no ``val_check_interval``: Lightning validates once per training epoch, and eva's
  ``EarlyStopping`` (``min_delta`` 0, ``mode: max``) counts its ``patience`` in those validation
  checks, that is in epochs (stop after ``patience`` epochs in a row without a strictly better
  score); ``checkpoint_type: best`` keeps the best head;
* ``patience`` is 20% of the epochs that 12,500 steps imply for that dataset's training split.

``linear_probe`` does the same: with batches of 256 an epoch of ``n`` training samples is
``ceil(n / 256)`` steps, validation runs after every epoch, and the patience in steps is
``patience * ceil(n / 256)``. When 12,500 steps end inside an epoch, that partial epoch is not
validated: Lightning (``training_epoch_loop.py`` ``_should_check_val_fx``, read in lightning 2.2.0
and 2.5.6 from PyPI) validates only at an epoch's last batch when ``val_check_interval`` is unset,
and reaching ``max_steps`` neither ends the epoch nor sets ``should_stop``.

The patience table, with where each value was read (kaiko-ai/eva's history is only partly stored,
so four values come from a copy of eva main's configs in another repository):

====================  ===============================  ========  ==========================================
config                monitor                          patience  read at
====================  ===============================  ========  ==========================================
``bach``              ``val/MulticlassAccuracy``       1,250     bogdandanciu/eva @ a5b6572d (an eva fork;
                                                                 alberto-scolari/eva @ 6eefb33b the same)
``bracs``             ``val/MulticlassAccuracy``       167       MedARC-AI/OpenMidnight @ 5c59df71
                                                                 ``eval_configs/bracs.yaml``
``breakhis``          ``val/MulticlassAccuracy``       500       kaiko-ai/eva @ 0847bc08
``crc``               ``val/MulticlassAccuracy``       7         kaiko-ai/eva @ 0fa9bce6
``gleason_arvaniti``  ``val/MulticlassAccuracy``       42        MedARC-AI/OpenMidnight @ 5c59df71
                                                                 ``eval_configs/gleason.yaml``
``mhist``             ``val/BinaryBalancedAccuracy``   278       MedARC-AI/OpenMidnight @ 5c59df71
                                                                 ``eval_configs/mhist.yaml``
``patch_camelyon``    ``val/BinaryBalancedAccuracy``   3         MedARC-AI/OpenMidnight @ 8def847d
                                                                 ``eval_configs/pcam.yaml``
``unitopatho``        ``val/MulticlassAccuracy``       100       DERIVED (no post-#772 copy is stored);
                                                                 monitor: kaiko-ai/eva @ 389f1510
====================  ===============================  ========  ==========================================

MedARC-AI/OpenMidnight's ``eval_configs`` are eva main's offline configs with its own backbone
swapped in: AdamW 3e-4 without a schedule, 12,500 steps, batch 256, and the same bach/breakhis/crc
patience as eva's (1,250 in its ``bach.yaml`` and 500 in ``breakhist.yaml`` @ 8def847d, 7 in
``crc.yaml`` @ 5c59df71), which is why its other values are taken as eva main's. Every value, read or not, is what ``eva_main_patience`` computes from the
train-split sizes in eva's dataset classes (``EVA_TRAIN_SIZES``, kaiko-eva 0.4.5 sdist from PyPI,
``src/eva/vision/data/datasets/classification/*.py``): ``ceil(0.2 * 12500 / ceil(n / 256))``,
rounded up (crc: 391 batches, 31.97 epochs, 6.39 -> 7; rounding to nearest would give 6). That
rule reproduces all seven read values; unitopatho's 100 is its result (6,270 samples: 25 batches,
500 epochs, 20% = 100 exactly) and is marked ``derived`` in ``EVA_TASKS``. Before #772 the values
were not all this rule at 5% (bracs 74 @ 07811553, gleason_arvaniti 21 @ 2f34979a, unitopatho 45 @
389f1510, where the rule gives 42, 11 and 25), so the derived value is a reading of the rule, not of
eva's file.

Whether a later commit changed these configs through v0.4.5 cannot be checked here: the stored
kaiko-ai/eva versions carry no dates or order, and the v0.4.5 sdist ships no configs. What can be
said: the three kaiko-ai/eva/fork versions cited have no ``lr_scheduler`` and 20% patience (so
they are at or after #772), and v0.4.5's dataset sizes still give exactly the table's values.
``eva_task(name)`` returns them.

``"evaluation-protocol-v2"``: eva's branch of that name (ad61be09), never merged into main. Its
configs validate every 50 steps (``val_check_interval: 50``), use the head
``eva.core.models.LinearClassifier`` (``BatchNorm1d(affine=False)``, then ``nn.Linear``
initialised N(0, 0.01) with a zero bias; ``src/eva/core/models/networks/linear.py`` @ 8f51ea8a)
except breakhis (630a7c9e, plain ``nn.Linear``), monitor ``val/BinaryBalancedAccuracy`` for
binary tasks, and stop early only for patch_camelyon (9 checks). Shared with main: AdamW 3e-4,
no schedule, 12,500 steps, batch 256, 5 runs.

Older eva versions (before #772: 5% of the epochs with a cosine schedule; before #690, October
2024: SGD at batch 4,096) are not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import EvaluationInputError

EVA_MAX_STEPS = 12_500
"""eva's optimiser steps per run for patch-level linear probes (main and evaluation-protocol-v2)."""

EVA_RUNS = 5
"""eva's runs per task (``n_runs``); their test scores are reported as mean ± std."""

EVA_BATCH_SIZE = 256
EVA_LR = 3e-4
EVA_WEIGHT_DECAY = 0.01
"""eva sets no weight decay, so AdamW's own default applies."""

EVA_EVAL_EVERY = 50
"""Steps between validation checks in evaluation-protocol-v2 (``val_check_interval``); eva main
validates once per epoch instead."""

MAIN = "main"
V2 = "evaluation-protocol-v2"
PROTOCOLS = (MAIN, V2)
"""The eva protocols ``linear_probe(protocol=...)`` accepts; ``"main"`` is the default."""

EVA_MAIN_COMMIT = "c36237c7"
"""kaiko-ai/eva#772's merge commit on main (2025-03), the protocol ``"main"`` follows."""

CONFIGS = "configs/vision/pathology/offline/classification"
_V2 = "ad61be09e4031a0dc3d2360f472c13a3cd6960a7"
_V2_BREAKHIS = "630a7c9ebf7dd4f64f5a703b4f98f7a9ed2cad3a"
_MAIN_BACH = "a5b6572d19838a7fdb1f6740768766812196fe94"  # in the fork bogdandanciu/eva
_MAIN_BREAKHIS = "0847bc080b63618c5b654007f0c264c999abae8f"
_MAIN_CRC = "0fa9bce686ffacb8d761a590fec1381c277c2d20"
_PRE772_UNITOPATHO = "389f15109811ec75e6145c2d9a591f79ccc5b344"  # monitor only; its patience (45) is pre-#772
_OPENMIDNIGHT = "MedARC-AI/OpenMidnight"  # eva main's offline configs, another backbone swapped in
_OM = "5c59df713a714e482e2a96ca799a017508469b63"
_OM_PCAM = "8def847d7b19247b6fc1fd5f802329b00933e416"

MULTICLASS = "val/MulticlassAccuracy"
BINARY = "val/BinaryBalancedAccuracy"

EVA_MAIN_PATIENCE_PERCENT = 20
"""kaiko-ai/eva#772: early-stopping patience is 20% of the epochs ``max_steps`` imply."""

EVA_TRAIN_SIZES: Dict[str, int] = {
    "bach": 268,
    "bracs": 3657,
    "breakhis": 1132,
    "crc": 100_000,
    "gleason_arvaniti": 15_303,
    "mhist": 2175,
    "patch_camelyon": 262_144,
    "unitopatho": 6270,
}
"""Training-split sizes as eva's dataset classes check them (kaiko-eva 0.4.5 sdist,
``src/eva/vision/data/datasets/classification/<name>.py``: ``_expected_dataset_lengths``,
``_expected_length`` or the ``length=`` given to ``check_dataset_integrity``)."""


def eva_main_patience(
    n_train: int, *, max_steps: int = 12_500, batch_size: int = 256, percent: int = EVA_MAIN_PATIENCE_PERCENT
) -> int:
    """eva main's patience for ``n_train`` training samples: ``percent``% of the epochs that
    ``max_steps`` imply, an epoch being ``ceil(n_train / batch_size)`` steps, rounded up.

    The rule reproduces every value read from eva main's configs (``EVA_TASKS``); integer
    arithmetic, so an exact result (bach: 1,250) is not pushed over by float rounding.
    """
    for name, value in (("n_train", n_train), ("max_steps", max_steps), ("batch_size", batch_size), ("percent", percent)):
        if int(value) < 1:
            raise EvaluationInputError(f"eva_main_patience: {name} must be >= 1, got {value}")
    steps_per_epoch = -(-int(n_train) // int(batch_size))
    return -(-int(max_steps) * int(percent) // (100 * steps_per_epoch))


@dataclass(frozen=True)
class EvaTask:
    """The settings one eva patch-classification config fixes beyond the shared protocol."""

    name: str
    monitor: str
    patience: Optional[int]  # EarlyStopping patience in validation checks; None: trains every step
    batch_norm: bool  # eva.core.models.LinearClassifier (True) or a plain torch.nn.Linear
    commit: str
    protocol: str = MAIN
    repo: str = "kaiko-ai/eva"
    path: Optional[str] = None  # the config's path in ``repo``; None: eva's own CONFIGS/<name>.yaml
    derived: bool = False  # patience computed by eva_main_patience, not read from a config

    @property
    def eval_every(self) -> Optional[int]:
        """Steps between validation checks; ``None``: once per epoch (eva main)."""
        return EVA_EVAL_EVERY if self.protocol == V2 else None

    @property
    def source(self) -> str:
        where = f"{self.repo} {self.path or f'{CONFIGS}/{self.name}.yaml'} @ {self.commit[:8]}"
        if self.derived:
            return (
                f"patience DERIVED (eva_main_patience({EVA_TRAIN_SIZES[self.name]}) = {self.patience}: "
                f"20% of the epochs 12,500 steps imply; no post-#772 config is stored); monitor from {where}"
            )
        return where


EVA_TASKS: Dict[str, EvaTask] = {
    task.name: task
    for task in (
        EvaTask("bach", MULTICLASS, 1250, False, _MAIN_BACH, repo="bogdandanciu/eva"),
        EvaTask("bracs", MULTICLASS, 167, False, _OM, repo=_OPENMIDNIGHT, path="eval_configs/bracs.yaml"),
        EvaTask("breakhis", MULTICLASS, 500, False, _MAIN_BREAKHIS),
        EvaTask("crc", MULTICLASS, 7, False, _MAIN_CRC),
        EvaTask("gleason_arvaniti", MULTICLASS, 42, False, _OM, repo=_OPENMIDNIGHT, path="eval_configs/gleason.yaml"),
        EvaTask("mhist", BINARY, 278, False, _OM, repo=_OPENMIDNIGHT, path="eval_configs/mhist.yaml"),
        EvaTask("patch_camelyon", BINARY, 3, False, _OM_PCAM, repo=_OPENMIDNIGHT, path="eval_configs/pcam.yaml"),
        EvaTask("unitopatho", MULTICLASS, 100, False, _PRE772_UNITOPATHO, derived=True),
    )
}
"""eva main's patch-level classification tasks (patience in epochs), by config name; where each
value was read, and the one derived, in the module docstring."""

EVA_V2_TASKS: Dict[str, EvaTask] = {
    task.name: task
    for task in (
        EvaTask("bach", MULTICLASS, None, True, _V2, V2),
        EvaTask("bracs", MULTICLASS, None, True, _V2, V2),
        EvaTask("breakhis", MULTICLASS, None, False, _V2_BREAKHIS, V2),  # no LinearClassifier version stored
        EvaTask("crc", MULTICLASS, None, True, _V2, V2),
        EvaTask("gleason_arvaniti", MULTICLASS, None, True, _V2, V2),
        EvaTask("mhist", BINARY, None, True, _V2, V2),
        EvaTask("patch_camelyon", BINARY, 9, True, _V2, V2),
        EvaTask("unitopatho", MULTICLASS, None, True, _V2, V2),
    )
}
"""The unmerged ``evaluation-protocol-v2`` branch's tasks (patience in checks of 50 steps)."""

SLIDE_LEVEL = ("camelyon16", "camelyon16_small", "panda", "panda_small", "panda_tiny")
"""eva's slide-level tasks: an ABMIL head on bags of patches, not a linear probe."""


def check_protocol(protocol: str) -> str:
    """``protocol`` if h0mini knows it, else an error naming the known ones."""
    if protocol not in PROTOCOLS:
        raise EvaluationInputError(f"unknown eva protocol {protocol!r}; known: {list(PROTOCOLS)}")
    return protocol


def eva_task(dataset: str, protocol: str = MAIN) -> EvaTask:
    """eva's settings for ``dataset`` (its config name, e.g. ``"bach"``) under ``protocol``.

    Raises:
        EvaluationInputError (a ValueError): a slide-level task, or a name eva has no config for.
    """
    tasks = EVA_TASKS if check_protocol(protocol) == MAIN else EVA_V2_TASKS
    key = str(dataset).lower().replace("-", "_")
    if key in tasks:
        return tasks[key]
    if key in SLIDE_LEVEL:
        raise EvaluationInputError(
            f"eva evaluates {dataset!r} at slide level with an ABMIL head (batch 32, lr 1e-3), not with a "
            f"linear probe; linear_probe covers eva's patch-level tasks {sorted(tasks)}"
        )
    raise EvaluationInputError(
        f"eva has no patch-level classification config named {dataset!r}; known: {sorted(EVA_V2_TASKS)}. "
        "For your own dataset leave dataset=None: eva's shared protocol without early stopping"
    )


__all__ = [
    "EVA_BATCH_SIZE",
    "EVA_EVAL_EVERY",
    "EVA_LR",
    "EVA_MAIN_COMMIT",
    "EVA_MAIN_PATIENCE_PERCENT",
    "EVA_MAX_STEPS",
    "EVA_RUNS",
    "EVA_TASKS",
    "EVA_TRAIN_SIZES",
    "EVA_V2_TASKS",
    "EVA_WEIGHT_DECAY",
    "EvaTask",
    "MAIN",
    "PROTOCOLS",
    "SLIDE_LEVEL",
    "V2",
    "eva_main_patience",
    "eva_task",
]
