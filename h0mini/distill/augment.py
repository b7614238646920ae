"""Multi-crop pathology augmentation: 2 global + N local crops per tile, as in DINOv2, adapted to H&E.

Per crop: random resized crop (bicubic), horizontal and vertical flips, a random
multiple of 90 degrees (tissue has no up), H&E stain jitter in the HED space
(Tellez et al. 2018: each stain channel scaled by U(1-s, 1+s) and shifted by
U(-s, s)), colour jitter, grayscale, Gaussian blur and (second global crop)
solarisation, then the model's normalisation.

Blur: DINOv2's public ``GaussianBlur(p=...)`` applies the blur with probability
``1 - p`` (it passes ``keep_p`` to ``RandomApply``), so its "always blur the first
global crop" never blurs it. Here ``p`` is the probability that the blur happens.

All randomness comes from a ``torch.Generator`` seeded per tile, so a tile gets
the same crops on any rank, worker or resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .config import AugmentConfig, CropsConfig

# Ruifrok & Johnston stain vectors (as skimage.color.rgb2hed), third row orthogonal.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED[2] = torch.linalg.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _happens(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p`` (one draw, always taken, so later draws do not shift with p)."""
    return float(torch.rand((), generator=generator)) < p


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> stain densities (haematoxylin, eosin, DAB)."""
    rgb = image.double().clamp_min(1e-6)
    od = torch.log(rgb) / _LOG_ADJUST
    return torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    log_rgb = -(stains * -_LOG_ADJUST)
    rgb = torch.exp(torch.einsum("dhw,dc->chw", log_rgb, _RGB_FROM_HED))
    return rgb.clamp(0.0, 1.0).float()


def hed_jitter(image: torch.Tensor, alpha: Sequence[float], beta: Sequence[float]) -> torch.Tensor:
    """Scale stain channel i by ``alpha[i]`` and shift it by ``beta[i]`` (identity for 1, 0)."""
    stains = rgb_to_hed(image)
    a = torch.tensor(alpha, dtype=stains.dtype).view(3, 1, 1)
    b = torch.tensor(beta, dtype=stains.dtype).view(3, 1, 1)
    return hed_to_rgb(stains * a + b)


def resized_crop_params(height: int, width: int, scale: Tuple[float, float], generator: torch.Generator,
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling, with our generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class CropSpec:
    size: int
    scale: Tuple[float, float]
    blur: float
    solarize: float


class MultiCrop:
    """Tile (uint8 (3, H, W) tensor) -> {"global_crops": (2, 3, G, G), "local_crops": (n, 3, L, L)}, normalised."""

    def __init__(self, crops: CropsConfig, augment: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        self.augment = augment
        self.global_specs = [
            CropSpec(crops.global_size, tuple(crops.global_scale), augment.blur_global[0], 0.0),
            CropSpec(crops.global_size, tuple(crops.global_scale), augment.blur_global[1], augment.solarize_global2),
        ]
        self.local_specs = [CropSpec(crops.local_size, tuple(crops.local_scale), augment.blur_local, 0.0)
                            for _ in range(crops.n_local)]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, tile: torch.Tensor, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        image = tile.float().div(255.0) if tile.dtype == torch.uint8 else tile.float()
        globals_ = [self.crop(image, spec, generator) for spec in self.global_specs]
        locals_ = [self.crop(image, spec, generator) for spec in self.local_specs]
        out = {"global_crops": torch.stack(globals_)}
        if locals_:
            out["local_crops"] = torch.stack(locals_)
        return out

    def crop(self, image: torch.Tensor, spec: CropSpec, generator: torch.Generator) -> torch.Tensor:
        """One augmented, normalised (3, size, size) crop."""
        a = self.augment
        top, left, h, w = resized_crop_params(image.shape[-2], image.shape[-1], spec.scale, generator)
        x = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size],
                            interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0.0, 1.0)
        if _happens(generator, a.hflip):
            x = x.flip(-1)
        if _happens(generator, a.vflip):
            x = x.flip(-2)
        if a.rot90:
            x = torch.rot90(x, int(torch.randint(0, 4, (), generator=generator)), dims=(-2, -1))
        x = self.photometric(x, spec, generator)
        return (x - self.mean) / self.std

    def photometric(self, x: torch.Tensor, spec: CropSpec, generator: torch.Generator) -> torch.Tensor:
        a = self.augment
        if _happens(generator, a.hed_jitter):
            s = a.hed_sigma
            alpha = [_uniform(generator, 1 - s, 1 + s) for _ in range(3)]
            beta = [_uniform(generator, -s, s) for _ in range(3)]
            x = hed_jitter(x, alpha, beta)
        if _happens(generator, a.color_jitter):
            x = self.color_jitter(x, generator)
        if _happens(generator, a.grayscale):
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _happens(generator, spec.blur):
            sigma = _uniform(generator, *a.blur_sigma)
            x = TF.gaussian_blur(x, kernel_size=[9, 9], sigma=[sigma, sigma])
        if _happens(generator, spec.solarize):
            x = TF.solarize(x, threshold=0.5)
        return x.clamp(0.0, 1.0)

    def color_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """torchvision's ColorJitter: the four adjustments in a random order, each factor drawn."""
        a = self.augment
        ops: List[Tuple[str, float]] = []
        if a.brightness:
            ops.append(("brightness", _uniform(generator, max(0.0, 1 - a.brightness), 1 + a.brightness)))
        if a.contrast:
            ops.append(("contrast", _uniform(generator, max(0.0, 1 - a.contrast), 1 + a.contrast)))
        if a.saturation:
            ops.append(("saturation", _uniform(generator, max(0.0, 1 - a.saturation), 1 + a.saturation)))
        if a.hue:
            ops.append(("hue", _uniform(generator, -a.hue, a.hue)))
        order = torch.randperm(len(ops), generator=generator).tolist()
        for index in order:
            name, factor = ops[index]
            x = getattr(TF, f"adjust_{name}")(x, factor)
        return x
