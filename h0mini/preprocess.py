"""Model-card preprocessing, split so the heavy half can run on the GPU.

The model card applies timm's eval transform to each PIL image: resize the
shorter side (bicubic, from ``crop_pct``), centre crop, ``ToTensor``, normalise.
Here the resize and crop run on uint8 pixels where the tile is decoded (skipped
when the tile already has the model's size, the common case), and the
conversion to float and the normalisation run on the whole batch on the model's
device with the same operations, so the numbers match the model card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import v2 as transforms_v2

from .errors import InvalidArgumentError, InvalidTileError
from .tiles import LazyTile, TileRef, centre_crop_resized, check_aspect, open_image, to_rgb

# A tile longer than this many input sizes on a side gets one warning per run (most of it is lost).
OVERSIZE_FACTOR = 2
Pixels = Union[np.ndarray, torch.Tensor]  # uint8 (H, W, 3) or float (3, H, W) in [0, 1]
# Up to this aspect ratio timm's own resize-then-crop runs (its intermediate is at most this many
# crops: 2.4 MB at 224 px); beyond it only the kept crop is resampled (``centre_crop_resized``).
EXACT_ASPECT_RATIO = 16


@dataclass
class Preprocessing:
    """Input size and normalisation of one model, read from its ``pretrained_cfg``."""

    size: Optional[int]  # None: native size (must be a multiple of the patch size)
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str
    crop_pct: float
    patch_size: int
    _resize: Any = field(default=None, repr=False)

    @classmethod
    def from_model(cls, model: torch.nn.Module, input_size: Union[int, str, None] = None) -> "Preprocessing":
        """``input_size``: None for the model's size, an int to resize to, ``"native"`` to keep each tile's size."""
        config = resolve_data_config({}, model=model)
        patch = _patch_size(model)
        if input_size == "native":
            size = None
        elif input_size is None:
            size = int(config["input_size"][-1])
        elif isinstance(input_size, int) and input_size > 0 and input_size % patch == 0:
            size = input_size
        else:
            raise InvalidArgumentError(
                f"input_size must be None, 'native' or a positive multiple of {patch}, got {input_size!r}",
                argument="input_size", accepted=f"None, 'native' or a positive multiple of {patch}")
        prep = cls(
            size=size,
            mean=tuple(float(m) for m in config["mean"]),
            std=tuple(float(s) for s in config["std"]),
            interpolation=str(config["interpolation"]),
            crop_pct=float(config["crop_pct"]),
            patch_size=patch,
        )
        if size is not None:
            eval_transform = create_transform(**dict(config, input_size=(3, size, size)))
            # Keep the resize and crop; ToTensor and Normalize happen batched on the device.
            prep._resize = type(eval_transform)(eval_transform.transforms[:-2])
        return prep

    def describe(self) -> Dict[str, Any]:
        return {
            "input_size": self.size if self.size is not None else "native",
            "resize": f"shorter side to {self.size}/{self.crop_pct}, {self.interpolation}, centre crop"
            if self.size is not None
            else "none",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def prepare(self, item: Any) -> Pixels:
        """Decode one tile to pixels at the model's input size: uint8 (H, W, 3) or float (3, H, W)."""
        return self.prepare_noting(item)[0]

    def prepare_noting(self, item: Any) -> Tuple[Pixels, Optional[str]]:
        """``prepare``, plus a note when the tile was much larger than the input (None otherwise).

        Slide regions (``LazyTile``) get no note: the slide reader picks their size on purpose.
        """
        if isinstance(item, LazyTile):
            return self._prepare_loaded(item.load()), None
        if isinstance(item, TileRef):
            item = open_image(item.path)
        elif isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            item = open_image(str(item))
        if isinstance(item, Image.Image):
            note = self._oversize_note(item.width, item.height)
        elif isinstance(item, torch.Tensor):
            note = self._oversize_note(item.shape[-1], item.shape[-2]) if item.ndim == 3 else None
        elif isinstance(item, np.ndarray):
            note = self._oversize_note(item.shape[1], item.shape[0]) if item.ndim in (2, 3) else None
        else:
            note = None
        return self._prepare_loaded(item), note

    def _prepare_loaded(self, item: Any) -> Pixels:
        if isinstance(item, Image.Image):
            return self._prepare_pil(to_rgb(item))
        if isinstance(item, torch.Tensor):
            return self._prepare_tensor(item)
        if isinstance(item, np.ndarray):
            return self._prepare_array(item)
        raise InvalidTileError(
            f"unsupported tile type {type(item).__name__}: expected a PIL image, a (H, W, 3) array, "
            "a (3, H, W) tensor or a path"
        )

    def _oversize_note(self, width: int, height: int) -> Optional[str]:
        """A tile more than twice the input size on a side loses most of its detail in the resize."""
        if self.size is None or max(width, height) <= OVERSIZE_FACTOR * self.size:
            return None
        return (f"{width}x{height} px, much larger than the model's {self.size} px input: resized "
                f"(shorter side to {self._scale_size()} px, {self.interpolation}, centre crop), so most of its detail "
                f"is lost; cut large images into {self.size} px tiles, and embed whole slides with embed-slides")

    def needs_resize(self, height: int, width: int) -> bool:
        """False only where timm's resize + centre crop is the identity: a square tile at crop_pct 1."""
        return (height, width) != (self.size, self.size) or self._scale_size() != self.size

    def _scale_size(self) -> int:
        return int(math.floor(self.size / self.crop_pct))  # as timm's create_transform computes it

    def _prepare_pil(self, image: Image.Image) -> np.ndarray:
        check_aspect(image.width, image.height)
        if self.size is None:
            self._check_native(image.height, image.width)
        elif self.needs_resize(image.height, image.width):
            image = self._resize_pil(image)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one

    def _resize_pil(self, image: Image.Image) -> Image.Image:
        scale_size = self._scale_size()
        elongated = max(image.size) > EXACT_ASPECT_RATIO * min(image.size)
        if elongated and scale_size >= self.size:  # (crop_pct > 1 pads: timm's transform, on a small image)
            return centre_crop_resized(image, scale_size, self.size, str_to_pil_interp(self.interpolation))
        return self._resize(image)

    def _prepare_array(self, array: np.ndarray) -> Pixels:
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise InvalidTileError(f"an array tile must be (H, W, 3) RGB, got shape {array.shape}")
        if array.dtype == np.uint8:
            if array.shape[2] == 3 and (self.size is None or not self.needs_resize(*array.shape[:2])):
                if self.size is None:
                    self._check_native(array.shape[0], array.shape[1])
                # Already RGB at the right size: no PIL round trip (torch.from_numpy needs it writable).
                return array if array.flags.writeable and array.flags.c_contiguous else np.array(array)
            mode = "RGBA" if array.shape[2] == 4 else "RGB"
            return self._prepare_pil(to_rgb(Image.fromarray(np.ascontiguousarray(array), mode)))
        if np.issubdtype(array.dtype, np.floating):
            if array.shape[2] != 3:
                raise InvalidTileError(f"a float array tile must have 3 channels, got shape {array.shape}")
            return self._prepare_tensor(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))
        raise InvalidTileError(f"array tiles must be uint8 (0-255) or float (0-1), got dtype {array.dtype}")

    def _prepare_tensor(self, tensor: torch.Tensor) -> Pixels:
        tensor = tensor.detach().cpu()
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise InvalidTileError(f"a tensor tile must be (3, H, W) RGB, got shape {tuple(tensor.shape)}")
        check_aspect(tensor.shape[2], tensor.shape[1])
        if tensor.dtype == torch.uint8:
            return self._prepare_pil(Image.fromarray(tensor.permute(1, 2, 0).numpy()))
        if not tensor.is_floating_point():
            raise InvalidTileError(f"tensor tiles must be uint8 (0-255) or float (0-1), got dtype {tensor.dtype}")
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise InvalidTileError("tile has NaN or infinite values")
        low, high = float(tensor.min()), float(tensor.max())
        if low < 0.0 or high > 1.0:
            raise InvalidTileError(
                f"float tiles must be in [0, 1] (unnormalised RGB), got values in [{low:.3g}, {high:.3g}]"
            )
        if self.size is None:
            self._check_native(tensor.shape[1], tensor.shape[2])
            return tensor
        if self.needs_resize(tensor.shape[1], tensor.shape[2]):
            # Tensors cannot take the PIL path without losing precision: torchvision's bicubic, antialiased.
            tensor = transforms_v2.functional.resize(
                tensor, [self._scale_size()], antialias=True, interpolation=_v2_mode(self.interpolation)
            )
            tensor = transforms_v2.functional.center_crop(tensor, [self.size, self.size]).clamp_(0, 1)
        return tensor

    def _check_native(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise InvalidTileError(
                f"input_size='native' needs sides that are multiples of {self.patch_size}, got {width}x{height}"
            )

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float batch (B, 3, H, W) on the model's device to model input, as ToTensor+Normalize.

        Never in place: ``batch`` is left as it was (a float batch is the caller's, or is split and
        normalised again when a CUDA out-of-memory error makes the batch smaller).
        """
        x = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        if x is batch:  # float32 already: batch.float() is batch itself, so x - mean is a new tensor
            return (x - mean).div_(std)
        # Converted (uint8, the pipeline's batches): the same operations in place, one float batch
        # written instead of two (the same values bit for bit; a CPU forward spent a quarter of its
        # time here with a second batch-sized allocation per batch).
        return x.sub_(mean).div_(std)


def _v2_mode(name: str) -> transforms_v2.InterpolationMode:
    return {"bilinear": transforms_v2.InterpolationMode.BILINEAR, "nearest": transforms_v2.InterpolationMode.NEAREST}.get(
        name, transforms_v2.InterpolationMode.BICUBIC
    )


def _patch_size(model: torch.nn.Module) -> int:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        return 1
    return int(size[0] if isinstance(size, (tuple, list)) else size)
