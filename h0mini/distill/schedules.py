"""Per-iteration schedules, precomputed once and indexed by iteration (DINOv2's ``CosineScheduler``).

Because every value is a pure function of the iteration, a resumed run reads the
same lr, weight decay, teacher temperature and EMA momentum as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import DistillConfig


class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``base``, then cosine from ``base`` to ``final``.

    Indexing past the end returns ``final``.
    """

    def __init__(self, base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0,
                 freeze: int = 0):
        if total < 1:
            raise ValueError(f"total iterations must be >= 1, got {total}")
        self.final = float(final)
        freeze_part = np.zeros(min(freeze, total))
        warmup = max(0, min(warmup, total - len(freeze_part)))
        warmup_part = np.linspace(warmup_start, base, warmup, endpoint=False) if warmup else np.zeros(0)
        rest = total - len(freeze_part) - warmup
        steps = np.arange(rest)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(rest, 1)))
        self.values = np.concatenate([freeze_part, warmup_part, cosine]).astype(np.float64)

    def __getitem__(self, it: int) -> float:
        return float(self.values[it]) if it < len(self.values) else self.final


class WarmupConstant:
    """Linear from ``start`` to ``value`` over ``warmup`` iterations, then constant (teacher temperature)."""

    def __init__(self, start: float, value: float, warmup: int):
        self.start, self.value, self.warmup = float(start), float(value), int(warmup)

    def __getitem__(self, it: int) -> float:
        if it >= self.warmup:
            return self.value
        return self.start + (self.value - self.start) * it / self.warmup


@dataclass
class Schedules:
    lr: CosineSchedule
    weight_decay: CosineSchedule
    teacher_temp: WarmupConstant
    ema_momentum: CosineSchedule
    freeze_last_layer_iters: int

    @classmethod
    def from_config(cls, config: DistillConfig) -> "Schedules":
        total = config.train.iterations
        o = config.optim
        return cls(
            lr=CosineSchedule(config.lr(), o.min_lr, total, warmup=o.warmup_iters, warmup_start=0.0),
            weight_decay=CosineSchedule(o.weight_decay, o.weight_decay_end, total),
            teacher_temp=WarmupConstant(config.dinov2.warmup_teacher_temp, config.dinov2.teacher_temp,
                                        config.dinov2.warmup_teacher_temp_iters),
            ema_momentum=CosineSchedule(config.ema.momentum, config.ema.momentum_end, total),
            freeze_last_layer_iters=config.dinov2.freeze_last_layer_iters,
        )
