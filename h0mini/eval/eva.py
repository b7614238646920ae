"""kaiko's eva linear-probe protocol for patch-level classification, as its configs set it.

Two generations of eva's ``configs/vision/pathology/offline/classification/<dataset>.yaml`` are
available by name (``linear_probe(protocol=...)``):

``"main"`` (the default): eva's main branch after kaiko-ai/eva#772 (merged 2025-03, "Increase
patience to 20%"; the issue names its merge commit c36237c7, nothing newer changed the patch-level
configs through v0.4.5). The configs read set:

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
``patience * ceil(n / 256)``. It also checks after the very last step when 12,500 is not an
epoch's end (one more candidate for the best head; whether Lightning validates there was not
checked against its code). Per dataset, the newest post-#772 version found (kaiko-ai/eva's
history is only partly stored):

====================  ===========================  ========  ===========================================
config                monitor                      patience  read at
====================  ===========================  ========  ===========================================
``bach``              ``val/MulticlassAccuracy``   1,250     bogdandanciu/eva @ a5b6572d (an eva fork;
                                                             alberto-scolari/eva @ 6eefb33b the same)
``breakhis``          ``val/MulticlassAccuracy``   500       kaiko-ai/eva @ 0847bc08
``crc``               ``val/MulticlassAccuracy``   7         kaiko-ai/eva @ 0fa9bce6
====================  ===========================  ========  ===========================================

Not in the main table, because no post-#772 version of their config is stored (the newest ones
still carry the cosine schedule or SGD, the pre-#772 5% patience): ``bracs`` (07811553: 74),
``gleason_arvaniti`` (2f34979a: 21), ``mhist`` (2fea425c: 70), ``patch_camelyon`` (1e2d6709:
SGD, 9), ``unitopatho`` (389f1510: 45). An earlier reading cited bach 1,250 at kaiko-ai/eva
0cd58cc9; that version could not be reopened here, so the fork that carries it is cited instead.
``eva_task(name)`` names them and points to ``protocol="evaluation-protocol-v2"``.

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

MULTICLASS = "val/MulticlassAccuracy"
BINARY = "val/BinaryBalancedAccuracy"


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

    @property
    def eval_every(self) -> Optional[int]:
        """Steps between validation checks; ``None``: once per epoch (eva main)."""
        return EVA_EVAL_EVERY if self.protocol == V2 else None

    @property
    def source(self) -> str:
        return f"{self.repo} {CONFIGS}/{self.name}.yaml @ {self.commit[:8]}"


EVA_TASKS: Dict[str, EvaTask] = {
    task.name: task
    for task in (
        EvaTask("bach", MULTICLASS, 1250, False, _MAIN_BACH, repo="bogdandanciu/eva"),
        EvaTask("breakhis", MULTICLASS, 500, False, _MAIN_BREAKHIS),
        EvaTask("crc", MULTICLASS, 7, False, _MAIN_CRC),
    )
}
"""eva main's patch-level classification tasks (patience in epochs), by config name; only those
whose post-#772 config is stored (see the module docstring)."""

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
        EvaluationInputError (a ValueError): a slide-level task, a name eva has no config for, or
            a task whose eva-main config is not known here.
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
    if key in EVA_V2_TASKS:
        raise EvaluationInputError(
            f"eva main's config for {dataset!r} (after kaiko-ai/eva#772) is not in the stored history, so its "
            f"patience is unknown here; main is known for {sorted(EVA_TASKS)}. Pass "
            f"protocol={V2!r} for the unmerged branch's settings, or dataset=None with patience= in steps"
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
    "EVA_MAX_STEPS",
    "EVA_RUNS",
    "EVA_TASKS",
    "EVA_V2_TASKS",
    "EVA_WEIGHT_DECAY",
    "EvaTask",
    "MAIN",
    "PROTOCOLS",
    "SLIDE_LEVEL",
    "V2",
    "eva_task",
]
