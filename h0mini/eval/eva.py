"""kaiko's eva linear-probe protocol for patch-level classification, as its configs set it.

Read from kaiko-ai/eva ``configs/vision/pathology/offline/classification/<dataset>.yaml`` at the
commits named below (the newest stored versions found; eva's history is not fully crawled, see
the README table). Every patch-level config there shares:

* ``max_steps`` 12,500, ``n_runs`` 5, train batch size 256;
* ``torch.optim.AdamW`` with ``lr`` 3e-4 and no other argument (so torch's weight decay, 0.01),
  no learning-rate scheduler;
* validation every 50 steps (``val_check_interval: 50``, ``check_val_every_n_epoch: null``), the
  best head on the monitored metric kept (``checkpoint_type: best``);
* the head ``eva.core.models.LinearClassifier``: ``BatchNorm1d(affine=False)`` on the embeddings,
  then ``nn.Linear`` initialised N(0, 0.01) with a zero bias (eva
  ``src/eva/core/models/networks/linear.py`` @ 8f51ea8a), except where ``batch_norm`` is False;
* multiclass tasks: cross-entropy, monitor ``val/MulticlassAccuracy`` (macro average, that is
  balanced accuracy); binary tasks: one logit, ``BCEWithLogitsLoss``, monitor
  ``val/BinaryBalancedAccuracy``.

What differs per dataset is whether ``EarlyStopping`` is configured, and with which patience.
eva counts patience in validation checks (Lightning's rule: stop after ``patience`` checks in a
row without a strictly better score); ``linear_probe`` counts steps, ``patience * 50``.

Older eva versions differ (an earlier generation stopped after 20% of the epochs, e.g. bach 1,250
epochs at 0cd58cc9, crc 7 at 0fa9bce6, breakhis 500 at 0847bc08, with a plain ``nn.Linear`` head
validated once per epoch; before kaiko-ai/eva#772, March 2025, 5% with a cosine schedule; before
#690, October 2024, SGD at batch 4,096). Those are not what this module reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import EvaluationInputError

EVA_MAX_STEPS = 12_500
"""eva's optimiser steps per run for patch-level linear probes."""

EVA_RUNS = 5
"""eva's runs per task (``n_runs``); their test scores are reported as mean ± std."""

EVA_BATCH_SIZE = 256
EVA_LR = 3e-4
EVA_WEIGHT_DECAY = 0.01
"""eva sets no weight decay, so AdamW's own default applies."""

EVA_EVAL_EVERY = 50
"""Steps between validation checks (eva's ``val_check_interval``)."""

CONFIGS = "kaiko-ai/eva configs/vision/pathology/offline/classification"
_LATEST = "ad61be09e4031a0dc3d2360f472c13a3cd6960a7"
_BREAKHIS = "630a7c9ebf7dd4f64f5a703b4f98f7a9ed2cad3a"

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

    @property
    def source(self) -> str:
        return f"{CONFIGS}/{self.name}.yaml @ {self.commit[:8]}"


EVA_TASKS: Dict[str, EvaTask] = {
    task.name: task
    for task in (
        EvaTask("bach", MULTICLASS, None, True, _LATEST),
        EvaTask("bracs", MULTICLASS, None, True, _LATEST),
        EvaTask("breakhis", MULTICLASS, None, False, _BREAKHIS),  # no LinearClassifier version stored
        EvaTask("crc", MULTICLASS, None, True, _LATEST),
        EvaTask("gleason_arvaniti", MULTICLASS, None, True, _LATEST),
        EvaTask("mhist", BINARY, None, True, _LATEST),
        EvaTask("patch_camelyon", BINARY, 9, True, _LATEST),
        EvaTask("unitopatho", MULTICLASS, None, True, _LATEST),
    )
}
"""eva's patch-level classification tasks by config name."""

SLIDE_LEVEL = ("camelyon16", "camelyon16_small", "panda", "panda_small", "panda_tiny")
"""eva's slide-level tasks: an ABMIL head on bags of patches, not a linear probe."""


def eva_task(dataset: str) -> EvaTask:
    """eva's settings for ``dataset`` (its config name, e.g. ``"bach"``).

    Raises:
        EvaluationInputError (a ValueError): a slide-level task, or a name eva has no config for.
    """
    key = str(dataset).lower().replace("-", "_")
    if key in EVA_TASKS:
        return EVA_TASKS[key]
    if key in SLIDE_LEVEL:
        raise EvaluationInputError(
            f"eva evaluates {dataset!r} at slide level with an ABMIL head (batch 32, lr 1e-3), not with a "
            f"linear probe; linear_probe covers eva's patch-level tasks {sorted(EVA_TASKS)}"
        )
    raise EvaluationInputError(
        f"eva has no patch-level classification config named {dataset!r}; known: {sorted(EVA_TASKS)}. "
        "For your own dataset leave dataset=None: eva's shared protocol without early stopping"
    )


__all__ = [
    "EVA_BATCH_SIZE",
    "EVA_EVAL_EVERY",
    "EVA_LR",
    "EVA_MAX_STEPS",
    "EVA_RUNS",
    "EVA_TASKS",
    "EVA_WEIGHT_DECAY",
    "EvaTask",
    "SLIDE_LEVEL",
    "eva_task",
]
