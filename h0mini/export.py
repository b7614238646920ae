"""``export_onnx()``: a validated ONNX export of a model, and int8 only behind an accuracy gate.

The export folder holds ``model.onnx`` (dynamic batch, the model's input size), a JSON with
everything needed to run it without h0mini (preprocessing, token layout, outputs, the source
weights' provenance, the validation figures) and a README with the preprocessing in numpy.

Validation runs the export through the same ``embed_tiles`` path as the torch model, on real
tiles. fp32 must match torch fp32 to 1e-4 (relative to the largest token value). int8 is ONNX
Runtime's *static* QDQ quantisation (per-channel weights, activation ranges calibrated on the
user's tiles, only the linear layers with constant weights quantised; attention products,
softmax, norms and the patch embedding stay float). Dynamic int8 is not offered: its
activation scales come from each batch, so a tile's embedding would depend on its neighbours.
int8 is written only when, on held-out tiles not used for calibration, the CLS cosine to torch
fp32 is at least 0.995 everywhere and 0.999 on average, and a tile embeds the same alone as in
a batch. Otherwise nothing is written and the error names the failed bar.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from .constants import NUM_PREFIX_TOKENS
from .embed import embed_tiles
from .deprecation import take_options
from .errors import (ExportValidationError, InvalidArgumentError, InvalidTileError, OptionalDependencyError,
                     OutputNotWritableError)
from .onnx_model import (CONFIG_FILE, FORMAT, FORMAT_VERSION, INPUT_NAME, MODEL_FILE, OUTPUT_NAME,
                         import_onnxruntime, load_onnx_model)
from .preprocess import Preprocessing
from .tiles import read_input
from .version import __version__
from .wording import say
from .atomic import atomic_folder
from .writers import check_writable

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
OPSET = 18

# The bars. fp32: max |ORT - torch| over all tokens, relative to the largest |torch| value.
FP32_MAX_REL_DIFF = 1e-4
# int8, on held-out tiles: CLS cosine to torch fp32, and tile alone vs in a batch (same relative measure).
INT8_MIN_COSINE = 0.995
INT8_MEAN_COSINE = 0.999
BATCH_MAX_REL_DIFF = 1e-4
HELD_OUT_EVERY = 3  # every 3rd tile is held out of calibration
MIN_INT8_TILES = 6
# Below this many held-out tiles the int8 gate still runs, but its verdict rests on few tiles: a warning says so.
MIN_HELD_OUT_TILES = 16


@dataclass
class Validation:
    """Agreement of an export with torch fp32 on real tiles (``cls`` and ``cls+mean`` embeddings)."""

    tiles: int
    max_abs_diff: Dict[str, float]
    min_cosine: Dict[str, float]
    mean_cosine: Dict[str, float]
    max_rel_token_diff: float
    batch_max_rel_diff: Optional[float] = None
    calibration_tiles: Optional[int] = None
    failed: List[str] = field(default_factory=list)

    def summary(self, label: str) -> str:
        parts = [f"{label} vs torch fp32 on {self.tiles} tiles:"]
        for name in self.min_cosine:
            parts.append(f"{name}: max abs {self.max_abs_diff[name]:.2e}, min cos {self.min_cosine[name]:.6f}, "
                         f"mean cos {self.mean_cosine[name]:.6f};")
        parts.append(f"tokens max rel diff {self.max_rel_token_diff:.2e}")
        if self.batch_max_rel_diff is not None:
            parts.append(f"; alone vs batched max rel diff {self.batch_max_rel_diff:.2e}")
        return " ".join(parts)


@dataclass
class ExportResult:
    folder: Path
    precision: str
    fp32: Validation
    int8: Optional[Validation] = None


def export_onnx(
    model: torch.nn.Module,
    output_dir: Union[str, os.PathLike, None] = None,
    *,
    quantize: Optional[str] = None,
    calibration: Any = None,
    max_tiles: int = 64,
    opset: int = OPSET,
    **options: Any,
) -> ExportResult:
    """Export ``model`` (a timm ViT of the H0-mini family) to an ONNX folder, validated on real tiles.

    Args:
        model: from ``load_model()``; its ``h0mini_weights`` provenance goes into the JSON.
        output_dir: the folder to create. It must not exist (or be empty); it appears only when every
            check passed.
        quantize: None (fp32) or ``"int8"`` (static QDQ, written only if it passes the gate).
        calibration: validation (and, for int8, calibration) tiles: a folder, a list of files, a glob,
            a uint8 stack... Default: the 7 CC0 tiles shipped in the package (``h0mini/data/tiles``),
            enough to validate fp32. For int8 use tiles of your own data: every 3rd is held out of
            calibration to judge the result, and fewer than 16 held out (48 tiles) warns.
        max_tiles: tiles used at most, spread evenly over ``calibration``.
        opset: ONNX opset.
        **options: only the names of the previous release (``output=``, ``tiles=``), with a
            ``DeprecationWarning``.

    Returns:
        ``ExportResult`` with the folder and the validation figures (also in the folder's JSON).

    Raises:
        ExportValidationError: a bar failed (``.failed`` names it); nothing is written.
        OutputNotWritableError: ``output`` exists and is not empty.
        OptionalDependencyError: onnx/onnxruntime (``pip install 'h0mini[onnx]'``) are missing.

    Example:
        >>> result = export_onnx(h0mini.load_model(), "h0mini-onnx")
        >>> h0mini.embed_tiles("tiles/", "h0mini-onnx").shape
        (7, 1536)
    """
    renamed = take_options("export_onnx", export_onnx, options, {"output_dir": output_dir, "calibration": calibration})
    output_dir, calibration = renamed["output_dir"], renamed["calibration"]
    if output_dir is None:
        raise InvalidArgumentError("export_onnx needs output_dir: the folder to create")
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")
    folder = Path(output_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputNotWritableError(f"{str(folder)!r} already exists and is not an empty folder; remove it or pick "
                                     "another output folder")
    check_writable(folder.parent, folder=True)
    import_onnx_packages()
    model = _fp32_cpu(model)
    preprocessing = Preprocessing.from_model(model)
    with shipped_tiles() as default_tiles:
        pixels = _read_tiles(default_tiles if calibration is None else calibration, preprocessing, max_tiles)
    if quantize and len(pixels) < MIN_INT8_TILES:
        raise InvalidTileError(f"int8 needs at least {MIN_INT8_TILES} tiles (calibration and held-out), got "
                               f"{len(pixels)}; pass more tiles of your own data with "
                               + say("calibration=", "--calibration TILES"))
    reference = _embed(model, pixels)
    with atomic_folder(folder) as work:
        config = export_config(model, preprocessing, opset)
        _export_graph(model, work / MODEL_FILE, preprocessing.size, opset)
        _write_config(work, config)
        fp32 = _validate(load_onnx_model(work), pixels, reference)
        logger.info(fp32.summary("ONNX Runtime fp32"))
        if fp32.max_rel_token_diff > FP32_MAX_REL_DIFF:
            fp32.failed.append(f"fp32 parity: tokens differ by {fp32.max_rel_token_diff:.2e} (relative) > "
                               f"{FP32_MAX_REL_DIFF:g}")
            raise ExportValidationError(fp32.failed, fp32.summary("ONNX Runtime fp32"))
        config["validation"] = {"fp32": asdict(fp32)}
        result = ExportResult(folder, "fp32", fp32)
        if quantize == "int8":
            result.int8 = _quantize_and_gate(work, pixels, reference, preprocessing, config)
            result.precision = config["precision"] = "int8"
        _write_config(work, config)
        (work / "README.md").write_text(export_readme(config))
    return result


@contextlib.contextmanager
def shipped_tiles() -> Iterator[Path]:
    """The folder of CC0 tiles in the package (``h0mini/data/tiles``), as a real path while in use."""
    from importlib import resources

    with resources.as_file(resources.files("h0mini.data") / "tiles") as folder:
        if not folder.is_dir() or not any(folder.glob("*.png")):
            raise InvalidTileError(
                f"the calibration tiles shipped with h0mini are missing from {str(folder)!r} (a broken install?); "
                "pass tiles of your own with " + say("calibration=", "--calibration TILES")
            )
        yield folder


def import_onnx_packages() -> None:
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(package)
        except ImportError as error:
            raise OptionalDependencyError(package, extra="onnx", feature="ONNX export") from error


def _fp32_cpu(model: torch.nn.Module) -> torch.nn.Module:
    parameter = next(model.parameters(), None)
    if parameter is None or not hasattr(model, "forward_features"):
        raise TypeError(f"export_onnx needs a torch model from load_model(), got {type(model).__name__}")
    if parameter.dtype == torch.float32 and parameter.device.type == "cpu":
        return model.eval()
    twin = copy.deepcopy(model).to("cpu", torch.float32).eval()
    twin.h0mini_weights = getattr(model, "h0mini_weights", None)
    return twin


def _read_tiles(tiles: Any, preprocessing: Preprocessing, max_tiles: int) -> torch.Tensor:
    """Tiles at the model's input size as a float (N, 3, H, W) batch in [0, 1]."""
    option = say("calibration=", "--calibration")
    try:
        items = list(read_input(tiles).items)
    except InvalidTileError as error:
        raise InvalidTileError(f"{option} {error}") from error
    if not items:
        raise InvalidTileError(f"no tiles in {tiles!r}; pass a folder or list of image tiles as {option}")
    if len(items) > max_tiles:
        items = [items[int(i)] for i in np.linspace(0, len(items) - 1, max_tiles).round()]
    batch = []
    for index, item in enumerate(items):
        try:
            pixels = preprocessing.prepare(item)
        except InvalidTileError as error:
            raise InvalidTileError(error.reason, index=index, source=getattr(item, "path", None)) from error
        tensor = torch.from_numpy(np.asarray(pixels)).permute(2, 0, 1) if isinstance(pixels, np.ndarray) else pixels
        batch.append(tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float())
    return torch.stack(batch)


def _embed(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 8) -> Dict[str, np.ndarray]:
    """``cls`` and ``cls+mean`` (and all tokens) through ``embed_tiles``, the path users run."""
    out = embed_tiles(pixels, model, embedding="all", precision="fp32", device="cpu", batch_size=batch_size,
                      num_workers=0, progress=False)
    tokens = np.concatenate([out["cls"][:, None], out["registers"], out["patch_tokens"]], axis=1)
    return {"cls": out["cls"], "cls+mean": np.concatenate([out["cls"], out["patch_tokens"].mean(1)], 1),
            "tokens": tokens}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def _validate(onnx_model: torch.nn.Module, pixels: torch.Tensor, reference: Dict[str, np.ndarray],
              rows: Optional[np.ndarray] = None) -> Validation:
    got = _embed(onnx_model, pixels)
    ref = reference if rows is None else {k: v[rows] for k, v in reference.items()}
    names = ("cls", "cls+mean")
    cos = {n: _cosines(got[n], ref[n]) for n in names}
    return Validation(
        tiles=len(pixels),
        max_abs_diff={n: float(np.abs(got[n] - ref[n]).max()) for n in names},
        min_cosine={n: float(cos[n].min()) for n in names},
        mean_cosine={n: float(cos[n].mean()) for n in names},
        max_rel_token_diff=_rel_diff(got["tokens"], ref["tokens"]),
    )


def batch_dependence(onnx_model: torch.nn.Module, pixels: torch.Tensor, tiles: Sequence[int]) -> float:
    """Largest relative change of a tile's tokens between running it alone and in a batch of all ``pixels``."""
    batched = _embed(onnx_model, pixels, batch_size=len(pixels))["tokens"]
    worst = 0.0
    for index in tiles:
        alone = _embed(onnx_model, pixels[index:index + 1], batch_size=1)["tokens"]
        worst = max(worst, _rel_diff(alone[0], batched[index]))
    return worst


def split_held_out(count: int) -> tuple:
    """(calibration rows, held-out rows): every ``HELD_OUT_EVERY``-th tile is held out."""
    rows = np.arange(count)
    held = rows % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return rows[~held], rows[held]


# Tried in order until one passes the gate: the linear layers that break accuracy first stay float.
KEEP_FLOAT_STEPS = ("none", "mlp_output")


def _quantize_and_gate(work: Path, pixels: torch.Tensor, reference: Dict[str, np.ndarray],
                       preprocessing: Preprocessing, config: Dict[str, Any]) -> Validation:
    """Quantise, then judge on held-out tiles; if a bar fails, retry with the MLP output projections in float."""
    calibration, held_out = split_held_out(len(pixels))
    if len(held_out) < MIN_HELD_OUT_TILES:
        warnings.warn(
            f"the int8 gate judges on {len(held_out)} held-out tiles (of {len(pixels)}; one tile in {HELD_OUT_EVERY} "
            f"is held out), fewer than the {MIN_HELD_OUT_TILES} it needs to say much: pass at least "
            f"{MIN_HELD_OUT_TILES * HELD_OUT_EVERY} tiles of your own data with "
            + say("calibration=", "--calibration TILES") + " (and --max-tiles if more than 64)",
            UserWarning, stacklevel=3,
        )
    normalised = preprocessing.normalize(pixels[calibration].clone()).numpy()
    fp32_path = work / "model.fp32.onnx"
    os.replace(work / MODEL_FILE, fp32_path)
    refusals = []
    for keep_float in KEEP_FLOAT_STEPS:
        quantize_static_qdq(fp32_path, work / MODEL_FILE, normalised, keep_float=keep_float)
        gate = _gate(load_onnx_model(work), pixels, reference, held_out)
        gate.calibration_tiles = len(calibration)
        if not gate.failed:
            break
        refusals.append(f"[linear layers kept float: {keep_float}] " + "; ".join(gate.failed))
    else:
        raise ExportValidationError(refusals, gate.summary("ONNX Runtime int8 (held-out tiles)"))
    fp32_path.unlink()
    config["validation"]["int8"] = asdict(gate)
    config["quantization"] = {
        "method": "onnxruntime static QDQ", "weights": "int8, per output channel, symmetric",
        "activations": "uint8, per tensor, MinMax calibration", "quantized": "MatMul/Gemm with constant weights",
        "kept_float": "patch embedding, attention products, softmax, norms, activations"
        + (", MLP output projections" if keep_float == "mlp_output" else ""),
        "calibration_tiles": len(calibration), "held_out_tiles": len(held_out),
    }
    return gate


def _gate(int8_model: torch.nn.Module, pixels: torch.Tensor, reference: Dict[str, np.ndarray],
          held_out: np.ndarray) -> Validation:
    gate = _validate(int8_model, pixels[held_out], reference, rows=held_out)
    gate.batch_max_rel_diff = batch_dependence(int8_model, pixels, held_out)
    logger.info(gate.summary("ONNX Runtime int8 (held-out tiles)"))
    if gate.min_cosine["cls"] < INT8_MIN_COSINE:
        gate.failed.append(f"int8 min CLS cosine {gate.min_cosine['cls']:.5f} < {INT8_MIN_COSINE}")
    if gate.mean_cosine["cls"] < INT8_MEAN_COSINE:
        gate.failed.append(f"int8 mean CLS cosine {gate.mean_cosine['cls']:.5f} < {INT8_MEAN_COSINE}")
    if gate.batch_max_rel_diff > BATCH_MAX_REL_DIFF:
        gate.failed.append(f"int8 batch invariance: a tile alone and in a batch differ by {gate.batch_max_rel_diff:.2e}"
                           f" (relative) > {BATCH_MAX_REL_DIFF:g}")
    return gate


def mlp_output_projections(path: Path) -> List[str]:
    """MatMul nodes whose constant weight does not take the embedding width: the MLP's fc2, fed by the SwiGLU
    product, whose outliers a per-tensor uint8 range handles worst."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    width = int(graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and weights[n.input[1]][0] != width]


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _ort_root_logging_contained() -> Iterator[None]:
    """ORT's quantiser logs through the root logger, which configures root logging as a side effect.

    That would make the caller's later log records print in logging's default format, and its
    "consider pre-processing" hint names an optional step h0mini replaces with its own gate on
    held-out tiles. Both are kept out; every other record passes as the caller configured.
    """
    root = logging.getLogger()
    placeholder = logging.NullHandler() if not root.handlers else None  # stops logging.basicConfig()
    hint = _DropPreprocessingHint()
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
        if placeholder is not None:
            root.removeHandler(placeholder)


def quantize_static_qdq(source: Path, target: Path, calibration: np.ndarray, keep_float: str = "none") -> None:
    """ONNX Runtime static QDQ int8: per-channel weights, activation ranges from ``calibration`` (N, 3, H, W).

    Only MatMul/Gemm with constant weights are quantised (``keep_float="mlp_output"``: not the MLP
    output projections either); attention products, softmax, norms and the patch embedding stay float.
    """
    import_onnxruntime("int8 quantisation")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(self.batches, None)

    with _ort_root_logging_contained():
        quantize_static(
            str(source), str(target), Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=mlp_output_projections(source) if keep_float == "mlp_output" else [],
            extra_options={"MatMulConstBOnly": True},
        )


class _Features(torch.nn.Module):
    """The graph to export: pixels in, all tokens out (CLS, registers, patches)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)


def _export_graph(model: torch.nn.Module, path: Path, size: int, opset: int) -> None:
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_Features(model).eval(), (example,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_shapes={"pixels": {0: batch}},
                          opset_version=opset, dynamo=True, external_data=False, verbose=False)


def export_config(model: torch.nn.Module, preprocessing: Preprocessing, opset: int) -> Dict[str, Any]:
    """The JSON beside ``model.onnx``: how to feed it, what comes out, and where the weights came from."""
    import onnx
    import onnxruntime

    size = int(preprocessing.size)
    grid = size // preprocessing.patch_size
    prefix = int(getattr(model, "num_prefix_tokens", NUM_PREFIX_TOKENS))
    dim = int(model.num_features)
    tokens = prefix + grid * grid
    weights = getattr(model, "h0mini_weights", None)
    source = weights.as_dict() if weights is not None else {"weights": "in-memory model"}
    arch = source.get("arch") or type(model).__name__
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "precision": "fp32",
        "architecture": {"arch": arch, "patch_size": preprocessing.patch_size, "embed_dim": dim,
                         "num_prefix_tokens": prefix, "num_registers": prefix - 1},
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "size": [size, size], "dtype": "float32",
                  "layout": "NCHW, RGB, normalised (see preprocessing)"},
        "preprocessing": {
            "resize": f"shorter side to round({size} / crop_pct) pixels", "interpolation": preprocessing.interpolation,
            "crop_pct": preprocessing.crop_pct, "crop": f"centre {size}x{size}",
            "scale": "uint8 / 255", "mean": list(preprocessing.mean), "std": list(preprocessing.std),
        },
        "output": {
            "name": OUTPUT_NAME, "shape": ["batch", tokens, dim], "dtype": "float32",
            "tokens": {"cls": 0, "registers": [1, prefix], "patches": [prefix, tokens],
                       "patch_grid": [grid, grid], "patch_order": "row-major"},
            "embeddings": {"cls": "tokens[:, 0]",
                           "cls+mean": f"concat(tokens[:, 0], tokens[:, {prefix}:].mean(axis=1)), registers excluded"},
        },
        "source": source,
        "exported_with": {"h0mini": __version__, "torch": str(torch.__version__), "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__, "opset": opset},
    }


def _write_config(folder: Path, config: Dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def export_readme(config: Dict[str, Any]) -> str:
    """The folder's README: the preprocessing in plain numpy, so any language can reproduce it."""
    prep, out, arch = config["preprocessing"], config["output"], config["architecture"]
    size = config["input"]["size"][0]
    prefix = arch["num_prefix_tokens"]
    validation = config["validation"]
    lines = [
        f"# {config['source'].get('weights', 'model')} as ONNX ({config['precision']})",
        "",
        f"Exported by h0mini {config['exported_with']['h0mini']} (opset {config['exported_with']['opset']}). "
        f"Source weights: repo {config['source'].get('repo_id')}, revision {config['source'].get('revision')}, "
        f"sha256 {config['source'].get('weights_sha256')}. Everything below is also in `{CONFIG_FILE}`.",
        "",
        "## Input",
        f"`{config['input']['name']}`: float32 `(batch, 3, {size}, {size})`, RGB. Tiles of another size: resize the "
        f"shorter side to `round({size} / {prep['crop_pct']})` with {prep['interpolation']} interpolation "
        f"(Pillow's), then centre-crop {size}x{size}. Then:",
        "",
        "```python",
        "import numpy as np",
        "from PIL import Image",
        "import onnxruntime as ort",
        "",
        f"MEAN = np.array({prep['mean']}, dtype=np.float32)",
        f"STD = np.array({prep['std']}, dtype=np.float32)",
        "",
        "def preprocess(tile):  # uint8 (H, W, 3) RGB array at the input size",
        "    x = tile.astype(np.float32) / 255.0",
        "    x = (x - MEAN) / STD",
        "    return x.transpose(2, 0, 1)  # (3, H, W)",
        "",
        f"session = ort.InferenceSession('{MODEL_FILE}')",
        "tiles = [np.asarray(Image.open(p).convert('RGB')) for p in paths]",
        f"tokens = session.run(['{out['name']}'], {{'{config['input']['name']}': np.stack([preprocess(t) for t in tiles])}})[0]",
        "```",
        "",
        "## Output",
        f"`{out['name']}`: float32 `{out['shape']}`: token 0 is CLS, tokens 1-{prefix - 1} are the registers, "
        f"tokens {prefix}-{out['shape'][1] - 1} the {out['tokens']['patch_grid'][0]}x{out['tokens']['patch_grid'][1]} "
        "patch grid in row-major order.",
        "",
        "```python",
        "cls = tokens[:, 0]                                   # 'cls' embedding",
        f"cls_mean = np.concatenate([cls, tokens[:, {prefix}:].mean(1)], 1)  # 'cls+mean' (the model card's), registers excluded",
        "```",
        "",
        "## Validation (against torch fp32 on real tiles)",
        "",
    ]
    for label, figures in validation.items():
        lines.append(f"- {label}: {figures['tiles']} tiles, CLS min cosine {figures['min_cosine']['cls']:.6f}, "
                     f"mean {figures['mean_cosine']['cls']:.6f}, max abs diff {figures['max_abs_diff']['cls']:.2e}")
    if config["precision"] == "int8":
        lines += ["", "int8 passed h0mini's gate on the held-out tiles above. Rerun the export's gate on your own "
                  "tiles when your data differ from the calibration tiles."]
    return "\n".join(lines) + "\n"
