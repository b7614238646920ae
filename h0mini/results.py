"""Results: pooling tokens into embeddings, assembling batches in input order, converting them.

Pure functions of tensors (plus the records of skipped tiles and the progress bar), so the
pipeline (``h0mini.pipeline``) and the backends (``h0mini.backend``) know nothing of them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import InvalidArgumentError, InvalidTileError, shown

class SkippedTilesWarning(UserWarning):
    """Some tiles could not be read and were left out (``on_error="skip"``); ``.skipped`` lists them."""

    def __init__(self, skipped: List["SkippedTile"]):
        shown = "; ".join(str(s) for s in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        super().__init__(f"{len(skipped)} tile(s) skipped: {shown}{more}")
        self.skipped = skipped


@dataclass(frozen=True)
class SkippedTile:
    index: int
    source: str
    reason: str

    def __str__(self) -> str:
        return f"tile {self.index} ({shown(self.source)}): {self.reason}"


@dataclass
class EmbeddedBatch:
    """One batch of results: ``indices`` are positions in the input, ``features`` maps output name to rows."""

    indices: np.ndarray
    features: Dict[str, torch.Tensor]
    skipped: List[SkippedTile] = field(default_factory=list)


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, output: str) -> Dict[str, torch.Tensor]:
    """Embeddings from ViT tokens (B, T, D): CLS first, then registers, then patches (never in the mean)."""
    cls = tokens[:, 0]
    patches = tokens[:, num_prefix_tokens:]
    if output == "cls":
        return {"cls": cls}
    if output == "mean":
        return {"mean": patches.mean(1)}
    if output == "cls+mean":
        return {"cls+mean": torch.cat([cls, patches.mean(1)], dim=-1)}
    if output == "patch_tokens":
        return {"patch_tokens": patches}
    return {"cls": cls, "registers": tokens[:, 1:num_prefix_tokens], "patch_tokens": patches}


def assemble(
    parts: List[EmbeddedBatch], output: str, empty_dim: Optional[Dict[str, Tuple[int, ...]]] = None
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    names = ["cls", "registers", "patch_tokens"] if output == "all" else [output]
    parts = [p for p in parts if len(p.indices)]
    if not parts:
        shapes = empty_dim or {}
        arrays = {n: torch.zeros((0, *shapes.get(n, (0,)))) for n in names}
    else:
        order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
        arrays = {}
        for name in names:
            values = [p.features[name] for p in parts]
            if len({tuple(v.shape[1:]) for v in values}) > 1:
                raise InvalidTileError(
                    f"tiles of different sizes give {name} of different shapes; use embedding='cls', 'mean' or "
                    "'cls+mean', or a fixed input_size"
                )
            arrays[name] = torch.cat(values)[torch.from_numpy(order)]
    return arrays if output == "all" else arrays[output]


def convert(result: Any, dtype: Any, return_tensors: bool) -> Any:
    if isinstance(result, dict):
        return {k: convert(v, dtype, return_tensors) for k, v in result.items()}
    if return_tensors:
        return result.to(_torch_dtype(dtype))
    return result.numpy().astype(_numpy_dtype(dtype), copy=False)


def check_return_dtype(dtype: Any, return_tensors: bool) -> None:
    """Refuse a return dtype before any tile is embedded, not after."""
    (_torch_dtype if return_tensors else _numpy_dtype)(dtype)


def _numpy_dtype(dtype: Any) -> np.dtype:
    """``"float16"``, ``np.float16``, ``np.dtype("f2")`` or ``torch.float16`` alike, as numpy's dtype."""
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype
    try:
        numpy_dtype = np.dtype(name)
    except TypeError:
        numpy_dtype = None
    # ml_dtypes (imported by onnx) registers a numpy bfloat16 that torch's .numpy() cannot produce.
    if numpy_dtype is None or numpy_dtype.kind not in "biuf":
        raise InvalidArgumentError(
            f"return_dtype: numpy has no dtype {str(dtype).replace('torch.', '')!r}; use a numpy "
            "integer or float dtype, or pass return_tensors=True for torch dtypes like bfloat16", argument="return_dtype", accepted="a numpy integer or float dtype")
    return numpy_dtype


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)  # "bfloat16": a torch dtype numpy does not know
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise InvalidArgumentError(f"return_dtype {dtype!r} is not a dtype torch knows",
                                   argument="return_dtype", accepted="a torch or numpy dtype, or its name")
    return value


# -- progress ------------------------------------------------------------------------------------------


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and "IPKernelApp" in shell.get_ipython().config  # type: ignore[union-attr]
    except Exception:
        return False


def make_progress(progress: Optional[bool], total: Optional[int], *, unit: str = "tile", desc: str = "h0mini",
                  leave: bool = True):
    """A tqdm bar counting tiles; shown on a terminal or in a notebook unless ``progress`` says otherwise."""
    notebook = _in_notebook()
    show = progress if progress is not None else (notebook or sys.stderr.isatty())
    if notebook:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, disable=not show, unit=unit, desc=desc, leave=leave, file=sys.stderr, dynamic_ncols=True)
