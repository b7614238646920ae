"""Helpers every evaluation shares: optional imports, the device rule, progress bars."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Union

import torch

from .. import runtime
from ..errors import OptionalDependencyError


def import_optional(package: str, feature: str) -> Any:
    """Import an optional dependency of ``h0mini[eval]`` or say how to install it.

    Raises:
        OptionalDependencyError: the package is not installed.
    """
    module = {"scikit-learn": "sklearn"}.get(package, package)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise OptionalDependencyError(package, extra="eval", feature=feature) from error


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None`` is the CPU (metrics are cheap); otherwise as everywhere in h0mini (``"auto"``, ``"cuda:1"``...)."""
    return torch.device("cpu") if device is None else runtime.resolve_device(device)


def progress_bar(progress: Optional[bool], *, total: int, unit: str, desc: str) -> Any:
    """A tqdm bar on stderr; by default shown only when stderr is a terminal."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, disable=not show, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)


__all__ = ["import_optional", "progress_bar", "resolve_device"]
