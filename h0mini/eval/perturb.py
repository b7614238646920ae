"""Controlled tile variants that mimic staining and scanner differences.

Each perturbation is a small pure function of a uint8 RGB array ``(H, W, 3)`` and explicit
physical parameters (stain scaling, JPEG quality, blur sigma...), returning a new array of the
same shape; at its identity parameters it returns an exact copy. ``PERTURBATIONS`` maps a
*strength* in [0, 1] to those parameters (strength 0 is always the identity) and lists the
default strengths the robustness report sweeps.

Randomness: the stain, brightness, contrast and gamma perturbations draw a direction (which
stain gets stronger, brighter or darker) from ``numpy.random.default_rng([seed, id])``, where
``id`` is fixed per perturbation. The same direction then applies to every tile and every
strength, as a real staining protocol or scanner shifts a whole slide the same way, and the
results are reproducible from the seed. The seed never sets the size of the change: the stain
direction is scaled so that its largest component is 1, so at strength ``s`` the more affected
stain is scaled by ``1 +- s`` and shifted by ``+-STAIN_SHIFT_SCALE * s``, whatever the seed.

Stain perturbation (Tellez et al., 2018, "HED" augmentation): RGB is converted to optical
density ``OD = -log10((I + 1) / 256)``, unmixed into haematoxylin, eosin and DAB
concentrations with the Ruifrok-Johnston (2001) stain matrix, each of H and E is scaled by
``alpha`` and shifted by ``beta``, and the result is mixed back. With ``alpha = 1, beta = 0``
the round trip is exact in uint8.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ..constants import MICRONS_PER_PIXEL
from ..errors import EvaluationInputError

ImageLike = Union[np.ndarray, Image.Image]

# Ruifrok & Johnston (2001), rows: haematoxylin, eosin, DAB optical-density vectors (R, G, B).
RGB_FROM_HED = np.array(
    [
        [0.650, 0.704, 0.286],
        [0.072, 0.990, 0.105],
        [0.268, 0.570, 0.776],
    ]
)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

STAIN_SHIFT_SCALE = 0.05
"""OD units of ``beta`` per unit strength (nuclei are about 0.5-1 OD of haematoxylin)."""


def _check_image(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise EvaluationInputError(f"perturbations take uint8 RGB arrays (H, W, 3), got {array.dtype} {array.shape}")
    return array


# --------------------------------------------------------------------------------------------
# The pure functions


def rgb_to_hed(image: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` to float64 stain concentrations (H, E, DAB) in OD units."""
    od = -np.log10((_check_image(image).astype(np.float64) + 1.0) / 256.0)
    return od @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Stain concentrations back to uint8 RGB (rounded, clipped to 0-255)."""
    od = np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED
    rgb = 256.0 * np.power(10.0, -od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_stain(image: np.ndarray, *, alpha: Sequence[float], beta: Sequence[float]) -> np.ndarray:
    """Scale each stain's concentration by ``alpha`` and shift it by ``beta`` (OD units).

    Args:
        image: uint8 RGB ``(H, W, 3)``.
        alpha: three factors for haematoxylin, eosin, DAB.
        beta: three shifts, in optical density.
    """
    hed = rgb_to_hed(image)
    hed = hed * np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64)
    return hed_to_rgb(hed)


def brightness(image: np.ndarray, *, factor: float) -> np.ndarray:
    """Multiply intensities by ``factor`` (PIL ``ImageEnhance.Brightness``)."""
    image = _check_image(image)
    if factor == 1:
        return image.copy()
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


def contrast(image: np.ndarray, *, factor: float) -> np.ndarray:
    """Stretch intensities around the tile's mean grey by ``factor`` (PIL ``ImageEnhance.Contrast``)."""
    image = _check_image(image)
    if factor == 1:
        return image.copy()
    return np.asarray(ImageEnhance.Contrast(Image.fromarray(image)).enhance(factor))


def gamma(image: np.ndarray, *, gamma: float) -> np.ndarray:
    """``255 * (I / 255) ** gamma`` per channel (a scanner's tone curve)."""
    image = _check_image(image)
    if gamma == 1:
        return image.copy()
    table = np.rint(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return table[image]


def jpeg(image: np.ndarray, *, quality: Union[int, None]) -> np.ndarray:
    """Encode as JPEG at ``quality`` (1-95, 4:2:0 chroma) and decode; ``None`` leaves the tile as is."""
    image = _check_image(image)
    if quality is None:
        return image.copy()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def gaussian_blur(image: np.ndarray, *, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (defocus)."""
    image = _check_image(image)
    if sigma == 0:
        return image.copy()
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def resample(image: np.ndarray, *, factor: float) -> np.ndarray:
    """Resample to ``factor`` times coarser pixels (bicubic, antialiased) and back to the tile size.

    Mimics a scanner with a coarser native resolution whose slide is resampled to the tile's
    µm/px: the field of view is kept, fine detail is lost.
    """
    image = _check_image(image)
    if factor == 1:
        return image.copy()
    if factor < 1:
        raise EvaluationInputError(f"resample factor must be >= 1 (coarser pixels), got {factor}")
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize(
        (max(1, round(width / factor)), max(1, round(height / factor))), Image.Resampling.BICUBIC
    )
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------
# Strength -> parameters


def _sign(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


def _direction(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random direction whose largest absolute component is 1, so that strength alone sets the size."""
    while True:
        draw = rng.uniform(-1.0, 1.0, size=size)
        peak = np.abs(draw).max()
        if peak > 1e-3:  # guards the (practically impossible) all-zero draw
            return draw / peak


def _stain_params(strength: float, rng: np.random.Generator) -> Dict[str, Any]:
    scale = _direction(rng, 2)
    shift = _direction(rng, 2)
    alpha = (1.0 + strength * scale[0], 1.0 + strength * scale[1], 1.0)
    beta = (STAIN_SHIFT_SCALE * strength * shift[0], STAIN_SHIFT_SCALE * strength * shift[1], 0.0)
    return {"alpha": tuple(float(a) for a in alpha), "beta": tuple(float(b) for b in beta)}


@dataclass(frozen=True)
class Perturbation:
    """One kind of perturbation: how a strength in [0, 1] becomes parameters of ``function``."""

    name: str
    description: str
    function: Callable[..., np.ndarray]
    parameters: Callable[[float, np.random.Generator], Dict[str, Any]]
    label: Callable[[Dict[str, Any]], str]
    strengths: Tuple[float, ...]

    def params(self, strength: float, *, seed: int = 0) -> Dict[str, Any]:
        """The parameters for ``strength`` (deterministic given ``seed``)."""
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:
            raise EvaluationInputError(f"perturbation {self.name!r}: strength must be in [0, 1], got {strength}")
        rng = np.random.default_rng([int(seed), zlib.crc32(self.name.encode())])
        return self.parameters(strength, rng)

    def describe(self, strength: float, *, seed: int = 0) -> str:
        """A short human-readable setting, e.g. ``"JPEG quality 52"``."""
        return self.label(self.params(strength, seed=seed))

    def __call__(self, image: ImageLike, strength: float, *, seed: int = 0) -> ImageLike:
        """Apply at ``strength``; a PIL image in gives a PIL image out, an array an array."""
        is_pil = isinstance(image, Image.Image)
        array = np.asarray(image.convert("RGB")) if is_pil else _check_image(image)
        out = self.function(array, **self.params(strength, seed=seed))
        return Image.fromarray(out) if is_pil else out


PERTURBATIONS: Dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation(
            "stain",
            "H&E stain intensity: haematoxylin and eosin concentrations scaled and shifted in HED space",
            hed_stain,
            _stain_params,
            lambda p: f"H x{p['alpha'][0]:.2f} {p['beta'][0]:+.3f}, E x{p['alpha'][1]:.2f} {p['beta'][1]:+.3f} OD",
            (0.0, 0.1, 0.2, 0.35, 0.5),
        ),
        Perturbation(
            "brightness",
            "overall brightness (scanner illumination)",
            brightness,
            lambda s, rng: {"factor": 1.0 + _sign(rng) * s},
            lambda p: f"brightness x{p['factor']:.2f}",
            (0.0, 0.1, 0.2, 0.3),
        ),
        Perturbation(
            "contrast",
            "contrast around the tile's mean grey",
            contrast,
            lambda s, rng: {"factor": 1.0 + _sign(rng) * s},
            lambda p: f"contrast x{p['factor']:.2f}",
            (0.0, 0.1, 0.2, 0.4),
        ),
        Perturbation(
            "gamma",
            "tone curve (scanner gamma)",
            gamma,
            lambda s, rng: {"gamma": float((1.0 + s) ** _sign(rng))},
            lambda p: f"gamma {p['gamma']:.2f}",
            (0.0, 0.1, 0.25, 0.5),
        ),
        Perturbation(
            "jpeg",
            "JPEG compression (scanner file format)",
            jpeg,
            lambda s, rng: {"quality": None if s == 0 else int(round(95 - 85 * s))},
            lambda p: "no JPEG" if p["quality"] is None else f"JPEG quality {p['quality']}",
            (0.0, 0.25, 0.5, 0.75, 1.0),
        ),
        Perturbation(
            "blur",
            "Gaussian blur (defocus)",
            gaussian_blur,
            lambda s, rng: {"sigma": 2.0 * s},
            lambda p: f"blur sigma {p['sigma']:.2f} px",
            (0.0, 0.25, 0.5, 1.0),
        ),
        Perturbation(
            "resample",
            "coarser scanner resolution, resampled back to the tile's µm/px",
            resample,
            lambda s, rng: {"factor": 1.0 + s},
            lambda p: f"{MICRONS_PER_PIXEL * p['factor']:.3g} µm/px",
            (0.0, 0.25, 0.5, 1.0),
        ),
    )
}
"""The perturbations of the robustness report, by name, with their default strengths."""


def get_perturbation(name: str) -> Perturbation:
    """The perturbation called ``name``.

    Raises:
        EvaluationInputError (a ValueError): unknown name (the message lists the known ones).
    """
    try:
        return PERTURBATIONS[name]
    except KeyError:
        raise EvaluationInputError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}") from None


def perturb(image: ImageLike, name: str, strength: float, *, seed: int = 0) -> ImageLike:
    """Apply the perturbation ``name`` at ``strength`` in [0, 1] (0 returns an exact copy).

    Args:
        image: a PIL image or a uint8 RGB array ``(H, W, 3)``.
        name: one of ``PERTURBATIONS``.
        strength: 0 (identity) to 1 (strongest).
        seed: fixes the random direction of stain, brightness, contrast and gamma.

    Returns:
        The variant, of the same kind (PIL or array) and size as ``image``.

    Raises:
        EvaluationInputError (a ValueError): unknown name, strength outside [0, 1], or not an RGB uint8 image.
    """
    return get_perturbation(name)(image, strength, seed=seed)


__all__ = [
    "PERTURBATIONS",
    "Perturbation",
    "brightness",
    "contrast",
    "gamma",
    "gaussian_blur",
    "get_perturbation",
    "hed_stain",
    "hed_to_rgb",
    "jpeg",
    "perturb",
    "resample",
    "rgb_to_hed",
]
