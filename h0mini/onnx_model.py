"""An ``h0mini export`` folder run by ONNX Runtime, shaped like the timm model ``embed_tiles`` expects.

``OnnxModel`` is an ``nn.Module`` without parameters whose ``forward_features`` hands the
normalised batch to ONNX Runtime and returns the token tensor (B, 1 + 4 + 256, D). It carries
the ``pretrained_cfg``, patch size and token layout of the exported model, so preprocessing,
pooling, batching, output files, resume and errors are those of the torch path: one pipeline,
two backends. ``onnxruntime`` is imported only when such a model is loaded.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from .errors import IncompatibleCheckpointError, ModelNotFoundError, OptionalDependencyError

MODEL_FILE = "model.onnx"
CONFIG_FILE = "h0mini_export.json"
FORMAT = "h0mini-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAME = "tokens"


def is_onnx_source(source: Union[str, os.PathLike]) -> bool:
    """A ``.onnx`` file, or a folder holding an export (``h0mini_export.json``)."""
    path = Path(source)
    return path.suffix.lower() == ".onnx" or (path.is_dir() and (path / CONFIG_FILE).is_file())


def import_onnxruntime(feature: str = "Running an exported ONNX model") -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise OptionalDependencyError("onnxruntime", extra="onnx", feature=feature) from error
    return onnxruntime


class OnnxModel(torch.nn.Module):
    """ONNX Runtime session of an export, with the attributes of the timm ViT it was exported from."""

    def __init__(self, session: Any, config: Dict[str, Any], model_path: Path):
        super().__init__()
        self.session = session
        self.config = config
        self.model_path = model_path
        arch = config["architecture"]
        self.num_prefix_tokens = int(arch["num_prefix_tokens"])
        self.num_features = self.embed_dim = int(arch["embed_dim"])
        self.patch_embed = SimpleNamespace(patch_size=(int(arch["patch_size"]),) * 2)
        prep = config["preprocessing"]
        size = int(config["input"]["size"][-1])
        self.pretrained_cfg = {
            "input_size": (3, size, size),
            "mean": tuple(prep["mean"]),
            "std": tuple(prep["std"]),
            "interpolation": prep["interpolation"],
            "crop_pct": float(prep["crop_pct"]),
            "crop_mode": "center",
        }
        self.precision = str(config.get("precision", "fp32"))
        self._lock = threading.Lock()  # one run at a time: ORT already uses every core for one batch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.pretrained_cfg["input_size"][1:])
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"{self.model_path} takes (B, 3, {expected[0]}, {expected[1]}) batches, got {tuple(x.shape)}: "
                "an ONNX export has a fixed input size; embed with input_size=None (the default)"
            )
        pixels = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            tokens = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        return torch.from_numpy(tokens).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def extra_repr(self) -> str:
        return f"{self.model_path}, {self.precision}, onnxruntime"


def export_files(source: Union[str, os.PathLike]) -> tuple:
    """(model.onnx, h0mini_export.json) of an export folder or of a ``.onnx`` file beside its JSON."""
    path = Path(source)
    model_path = path / MODEL_FILE if path.is_dir() else path
    config_path = model_path.parent / CONFIG_FILE
    if not model_path.is_file():
        raise ModelNotFoundError(f"No ONNX model at {str(model_path)!r}; export one with 'h0mini export -o FOLDER'.",
                                 name=str(model_path))
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{str(model_path)!r} has no {CONFIG_FILE} beside it: h0mini needs the export's preprocessing and token "
            f"layout. Keep the folder 'h0mini export' wrote together, or export again.",
            name=str(config_path),
        )
    return model_path, config_path


def read_export_config(config_path: Path) -> Dict[str, Any]:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise IncompatibleCheckpointError(f"Could not read {str(config_path)!r}: {error}. Export again.") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise IncompatibleCheckpointError(
            f"{str(config_path)!r} is not an h0mini export description (no \"format\": {FORMAT!r}). Export again."
        )
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{str(config_path)!r} has format_version {config['format_version']}, newer than this h0mini reads "
            f"({FORMAT_VERSION}); upgrade h0mini."
        )
    return config


def load_onnx_model(source: Union[str, os.PathLike], *, threads: Optional[int] = None) -> OnnxModel:
    """Open an export folder (or its ``model.onnx``) with ONNX Runtime on the CPU and check its shapes.

    Raises:
        ModelNotFoundError: no ``model.onnx`` or no ``h0mini_export.json`` beside it.
        IncompatibleCheckpointError: a corrupt file, or a model whose input or output shape is not
            the one its JSON describes.
        OptionalDependencyError: onnxruntime is not installed.
    """
    model_path, config_path = export_files(source)
    config = read_export_config(config_path)
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise IncompatibleCheckpointError(
            f"ONNX Runtime could not load {str(model_path)!r}: {type(error).__name__}: {str(error)[:300]}. "
            "The file is corrupt or truncated; export again."
        ) from error
    check_signature(session, config, model_path)
    return OnnxModel(session, config, model_path)


def check_signature(session: Any, config: Dict[str, Any], model_path: Path) -> None:
    """The graph's input and output must be the ones the JSON promises (a renamed file of another model is not)."""
    size = [int(s) for s in config["input"]["size"]]
    tokens, dim = (int(n) for n in config["output"]["shape"][1:])
    inputs = {i.name: list(i.shape) for i in session.get_inputs()}
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    problems = []
    if list(inputs) != [INPUT_NAME] or inputs[INPUT_NAME][1:] != [3, *size]:
        problems.append(f"inputs {inputs} (expected {INPUT_NAME!r}: [batch, 3, {size[0]}, {size[1]}])")
    if OUTPUT_NAME not in outputs or outputs[OUTPUT_NAME][1:] != [tokens, dim]:
        problems.append(f"outputs {outputs} (expected {OUTPUT_NAME!r}: [batch, {tokens}, {dim}])")
    if problems:
        raise IncompatibleCheckpointError(
            f"{str(model_path)!r} does not match its {CONFIG_FILE}: " + "; ".join(problems)
            + ". It is another model; export again with 'h0mini export'."
        )


class OnnxBackend:
    """ONNX Runtime behind ``h0mini.backend.Backend``: the CPU, the precision of the export, no torch.compile."""

    autocast_dtype = None
    weights_dtype = torch.float32

    def __init__(self, model: OnnxModel, *, device: Any, precision: str, compile: bool):
        from .errors import InvalidArgumentError

        if str(device) not in ("auto", "cpu"):
            raise InvalidArgumentError(
                f"{model.model_path} is an ONNX export and runs on the CPU (ONNX Runtime); use device='cpu'",
                argument="device", accepted="'auto' or 'cpu' for an ONNX export")
        if str(precision).lower() not in ("auto", "fp32", "float32"):
            raise InvalidArgumentError(
                f"{model.model_path} is an ONNX export ({model.precision}): its precision is fixed; use "
                "precision='auto'", argument="precision", accepted="'auto' for an ONNX export")
        if compile:
            raise InvalidArgumentError(f"compile=True applies to torch models; {model.model_path} is an ONNX export",
                                       argument="compile", accepted="False for an ONNX export")
        self.model = model
        self.device = torch.device("cpu")
        self.precision = f"onnxruntime-{model.precision}"

    def start_run(self) -> None:
        pass

    def autocast(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def tokens(self, x: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
        return self.model.forward_features(x)
