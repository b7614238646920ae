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
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional, Union

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
