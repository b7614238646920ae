"""``h0mini.distill``: distil a large frozen pathology teacher into a small student, the way H0-mini was made.

Needs the extra: ``pip install 'h0mini[distill]'``. ``import h0mini`` never imports
this package. Entry points::

    python -m h0mini.distill --config my.yaml train.iterations=1000
    torchrun --nproc-per-node 8 -m h0mini.distill --config my.yaml

or, from Python, ``train(load_config("my.yaml"))``. The modules follow DINOv2's
layout: ``config`` (typed config), ``data`` and ``augment`` and ``masking`` (tiles
to multi-crop batches), ``heads`` and ``losses`` (the objective), ``meta_arch``
(teacher + student + heads), ``schedules``, ``train`` (the loop) and ``export``.
"""

from __future__ import annotations

from .config import ConfigError, DistillConfig, load_config

__all__ = ["ConfigError", "DistillConfig", "load_config", "train"]


def __getattr__(name: str):
    # train pulls in timm models and torch.distributed: load it only when asked for.
    if name == "train":
        from .train import train

        return train
    raise AttributeError(name)
