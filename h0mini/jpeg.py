"""JPEG tiles decoded on the model's device (nvJPEG on CUDA) instead of by Pillow in the workers.

Workers then only read the file's bytes and check its header; the batch is decoded where the
model runs, by torchcodec (or torchvision's older decoder where torchcodec is not installed).
Only files that need no resize take this path (a JPEG at the model's input size, RGB or
grayscale, not EXIF-rotated); every other file, and any JPEG the device decoder rejects, is
decoded by Pillow as usual, so errors and results stay those of the CPU path.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Optional, Union

import numpy as np
import torch
from PIL import Image

from .errors import OptionalDependencyError

if TYPE_CHECKING:
    from .preprocess import Preprocessing

logger = logging.getLogger(__name__)

JPEG_DECODERS = ("cpu", "device")
EXIF_ORIENTATION = 0x0112


class EncodedJpeg(NamedTuple):
    """A JPEG file's bytes, to be decoded next to the model (a NamedTuple: DataLoader pins its tensor)."""

    data: torch.Tensor  # 1-D uint8
    path: str


class EncodedRegion(NamedTuple):
    """A slide region's stored JPEG tiles, undecoded, and where each goes (h0mini.wsi.stored_tiles).

    Decoded next to the model, pasted into ``size`` x ``size`` px, then area-averaged by the integer
    factor ``size // tile_size`` exactly as PIL's BOX filter does (same rounding: the CPU path's
    pixels, given the same decoded tiles; nvJPEG's decode against libjpeg-turbo's is unmeasured)."""

    tiles: List[torch.Tensor]  # 1-D uint8 JPEG streams
    boxes: torch.Tensor  # (n, 6) int64: out_y, out_x, tile_y, tile_x, height, width
    size: int
    tile_size: int
    path: Any  # the SlideRegion: what the CPU path reads if the device decoder rejects a tile


ENCODED = (EncodedJpeg, EncodedRegion)


def read_encoded(path: str, preprocessing: "Preprocessing") -> Optional[EncodedJpeg]:
    """The file's bytes when it is a JPEG the device can decode straight to model input, else None."""
    try:
        with Image.open(path) as image:  # reads the header only
            fits = image.format == "JPEG" and image.mode in ("RGB", "L") and preprocessing.size is not None
            fits = fits and not preprocessing.needs_resize(image.height, image.width)
            # torchcodec applies an EXIF rotation, Pillow (h0mini's CPU path) does not: keep one answer.
            fits = fits and image.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:  # noqa: BLE001 - unreadable here: the Pillow path reports it properly
        return None
    if not fits:
        return None
    return EncodedJpeg(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), path)


def decode_on_device(encoded: List[EncodedJpeg], device: torch.device) -> List[Optional[torch.Tensor]]:
    """(3, H, W) uint8 tensors on ``device``, in order; None where the decoder rejects a file."""
    if any(isinstance(item, EncodedRegion) for item in encoded):
        regions = iter(decode_regions([item for item in encoded if isinstance(item, EncodedRegion)], device))
        files = iter(decode_on_device([item for item in encoded if not isinstance(item, EncodedRegion)], device))
        return [next(regions) if isinstance(item, EncodedRegion) else next(files) for item in encoded]
    if not encoded:
        return []
    decode = jpeg_decoder()
    data = [item.data for item in encoded]
    try:
        return list(decode(data, device))
    except RuntimeError:
        pass  # one bad file fails the whole batch: find it, keep the others
    decoded: List[Optional[torch.Tensor]] = []
    for item in encoded:
        try:
            decoded.append(decode(item.data, device))
        except RuntimeError as error:
            logger.info("device JPEG decoder rejected %s (%s): decoding it with Pillow", item.path, error)
            decoded.append(None)
    return decoded


def decode_regions(regions: List[EncodedRegion], device: torch.device) -> List[Optional[torch.Tensor]]:
    """(3, tile_size, tile_size) uint8 tensors on ``device``; None where the decoder rejects a stored tile."""
    decode = jpeg_decoder()
    streams = [tile for region in regions for tile in region.tiles]
    try:
        decoded: List[Optional[torch.Tensor]] = list(decode(streams, device))
    except RuntimeError:  # one bad stream fails the batch: find it
        decoded = []
        for stream in streams:
            try:
                decoded.append(decode(stream, device))
            except RuntimeError:
                decoded.append(None)
    out: List[Optional[torch.Tensor]] = []
    start = 0
    for region in regions:
        parts = decoded[start : start + len(region.tiles)]
        start += len(region.tiles)
        if any(part is None for part in parts):
            out.append(None)
            continue
        canvas = torch.empty((3, region.size, region.size), dtype=torch.uint8, device=device)
        for part, (oy, ox, ty, tx, h, w) in zip(parts, region.boxes.tolist()):
            canvas[:, oy : oy + h, ox : ox + w] = part[:, ty : ty + h, tx : tx + w]
        out.append(box_downsample(canvas, region.size // region.tile_size))
    return out


_PRECISION_BITS = 22  # Pillow's 8-bit resampling: 32 - 8 - 2 fixed-point bits


def box_downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, H, W) uint8 shrunk by an integer ``factor``, equal to PIL's ``resize(BOX)``: a horizontal then a
    vertical pass, each a sum times Pillow's rounded fixed-point weight, rounded half up to uint8."""
    if factor == 1:
        return image
    weight = int(0.5 + (1 << _PRECISION_BITS) / factor)
    half = 1 << (_PRECISION_BITS - 1)
    c, h, w = image.shape
    x = image.to(torch.int64).reshape(c, h, w // factor, factor).sum(-1)
    x = ((x * weight + half) >> _PRECISION_BITS).clamp_(0, 255)
    x = x.reshape(c, h // factor, factor, w // factor).sum(2)
    return ((x * weight + half) >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


Decoder = Callable[[Union[torch.Tensor, List[torch.Tensor]], torch.device], Union[torch.Tensor, List[torch.Tensor]]]


def _torchcodec() -> Optional[Decoder]:
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # noqa: BLE001 - absent, or its native libraries do not match this torch
        return None
    return lambda data, device: decode_jpeg(data, mode="RGB", device=device)


def _torchvision() -> Optional[Decoder]:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001
        return None

    def decode(data, device):
        with warnings.catch_warnings():  # the user asked h0mini, not torchvision, to decode
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


BACKENDS = {"torchcodec": _torchcodec, "torchvision": _torchvision}


@functools.lru_cache(maxsize=1)
def jpeg_decoder() -> Decoder:
    """torchcodec's decoder where installed (``h0mini[jpeg]``; the maintained one), else torchvision's
    (deprecated since torchvision 0.29, still shipped with it)."""
    for name, backend in BACKENDS.items():
        decoder = backend()
        if decoder is not None:
            logger.debug("JPEG decoding on the device with %s", name)
            return decoder
    raise OptionalDependencyError("torchcodec", extra="jpeg", feature='jpeg_decode="device"')
