"""One small interface for what runs the forward pass: torch (``h0mini.runtime``) or ONNX Runtime.

``backend_for(model, device=, precision=, compile=)`` picks the backend for a model and checks the
settings against it; ``TileEmbedder`` then only calls ``start_run()``, ``autocast()`` and
``tokens(x)``, and reads ``device``, ``precision`` and ``weights_dtype``: it never asks which
backend runs. The ONNX backend lives beside the ONNX model (``h0mini.onnx_model``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional, Union

import torch

from .runtime import PRECISION_NAMES, ModelForward, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device]


class Backend:
    """What ``TileEmbedder`` needs of a backend.

    ``model`` is what it runs, ``device`` where input batches go, ``precision`` the name recorded
    with results (``"bf16"``, ``"onnxruntime-int8"``...), ``weights_dtype`` the parameters' dtype.
    ``tokens`` takes a normalised float batch (B, 3, H, W) on ``device`` and returns (B, T, D).
    """

    model: torch.nn.Module
    device: torch.device
    precision: str
    weights_dtype: torch.dtype = torch.float32
    autocast_dtype: Optional[torch.dtype] = None

    def start_run(self) -> None:
        """Called before each pass over a dataset."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def tokens(self, x: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(Backend):
    """A torch module: ``device="auto"`` runs it where it is; autocast and kernels from ``h0mini.runtime``."""

    def __init__(self, model: torch.nn.Module, *, device: DeviceLike, precision: str, compile: bool):
        if str(device) == "auto":  # a model object runs where it is (loaded ones went to CUDA when available)
            device = device_of(model, default="auto")
        self.device = resolve_device(device)
        # Never .eval() here: the model may be the caller's, in training; each forward pass runs in
        # eval mode and puts the training flags back (runtime.ModelForward).
        self.model = model.to(self.device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        log_precision(self.device, precision, self.autocast_dtype)
        parameter = next(self.model.parameters(), None)
        # A model loaded in bf16/fp16 takes inputs of its own dtype when no autocast converts them.
        self.weights_dtype = parameter.dtype if parameter is not None else torch.float32
        self._forward = ModelForward(self.model, self.device, self.autocast_dtype or self.weights_dtype, compile)

    @property
    def precision(self) -> str:  # type: ignore[override]
        return PRECISION_NAMES[self.autocast_dtype]

    def start_run(self) -> None:
        self._forward.start_run()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def tokens(self, x: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
        if self.autocast_dtype is None:
            x = x.to(self.weights_dtype)
        return self._forward(x, pad_to=pad_to)


def backend_for(model: torch.nn.Module, *, device: DeviceLike = "auto", precision: str = "auto",
                compile: bool = False) -> Backend:
    """The backend that runs ``model``; settings it cannot honour are ``InvalidArgumentError``s."""
    from .onnx_model import OnnxBackend, OnnxModel

    if isinstance(model, OnnxModel):
        return OnnxBackend(model, device=device, precision=precision, compile=compile)
    return TorchBackend(model, device=device, precision=precision, compile=compile)


def loading_device(source: str, device: DeviceLike) -> str:
    """The ``device`` to load weights ``source`` on: an ONNX export loads on the CPU whatever is asked
    (its backend then refuses another device by name)."""
    from .onnx_model import is_onnx_source

    return "auto" if is_onnx_source(source) else str(resolve_device(device))


def device_of(model: torch.nn.Module, default: str) -> DeviceLike:
    """The device of ``model``'s parameters (``default`` for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else default


_LOGGED_PRECISIONS: set = set()


def log_precision(device: torch.device, asked: str, dtype: Optional[torch.dtype]) -> None:
    """Say once per process and setting which precision runs (the CPU default depends on the hardware)."""
    name = PRECISION_NAMES[dtype]
    key = (device.type, str(asked), name)
    if key in _LOGGED_PRECISIONS:
        return
    _LOGGED_PRECISIONS.add(key)
    if str(asked).lower() == "auto" and device.type == "cpu":
        why = "this CPU has native bf16" if dtype is torch.bfloat16 else "this CPU has no native bf16"
        logger.info("embedding on the CPU in %s (precision='auto': %s)", name, why)
    else:
        logger.info("embedding on %s in %s (precision=%r)", device, name, asked)
