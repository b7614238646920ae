"""h0mini: H0-mini, the distilled pathology foundation model, as a Python package.

``import h0mini`` registers the architectures with timm (``h0_mini``,
``h_optimus_0``, ``h_optimus_1``, ``h0mini_test``) and does nothing else: no
network, no CUDA, no output. In the ``h0mini`` command's own process the public
names load on first use instead, so that the command parses its arguments before
torch is imported (seconds) and a usage error comes back at once.
"""

from __future__ import annotations

import logging

from . import interrupt as _interrupt

if _interrupt.started_as_command():  # before torch's seconds of importing: Ctrl-C gives one line, 130
    _interrupt.exit_on_interrupt()

from .errors import (
    EvaluationInputError,
    ExportValidationError,
    GatedModelError,
    H0miniError,
    HubConnectionError,
    IncompatibleCheckpointError,
    InvalidArgumentError,
    InvalidTileError,
    ModelNotFoundError,
    OptionalDependencyError,
    OutputNotWritableError,
    RevisionNotFoundError,
    SettingsMismatchError,
    SlideError,
    UnknownOptionError,
    WeightsNotCachedError,
)
from .version import __version__

# Public names that import torch, and the module of each.
_HEAVY = {
    "SkippedTile": "embed", "SkippedTilesWarning": "embed", "TileEmbedder": "embed", "embed_tiles": "embed",
    "WeightsInfo": "model", "load_model": "model", "weights_fingerprint": "model",
    "SlideEmbeddings": "wsi", "SlideTiles": "wsi", "embed_slide": "wsi", "embed_slides": "wsi", "tile_slide": "wsi",
}

if _interrupt.started_as_command():

    def __getattr__(name: str):  # PEP 562: the command's own process loads these on first use
        if name not in _HEAVY:
            raise AttributeError(f"module 'h0mini' has no attribute {name!r}")
        import importlib

        importlib.import_module(".registry", __name__)
        value = getattr(importlib.import_module(f".{_HEAVY[name]}", __name__), name)
        globals()[name] = value
        return value

else:
    from . import registry as _registry  # noqa: F401  (registers the timm entrypoints)
    from .embed import SkippedTile, SkippedTilesWarning, TileEmbedder, embed_tiles
    from .model import WeightsInfo, load_model, weights_fingerprint
    from .wsi import SlideEmbeddings, SlideTiles, embed_slide, embed_slides, tile_slide

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "load_model",
    "embed_tiles",
    "embed_slide",
    "embed_slides",
    "tile_slide",
    "SlideTiles",
    "SlideEmbeddings",
    "TileEmbedder",
    "SkippedTile",
    "SkippedTilesWarning",
    "WeightsInfo",
    "weights_fingerprint",
    "H0miniError",
    "GatedModelError",
    "ModelNotFoundError",
    "RevisionNotFoundError",
    "WeightsNotCachedError",
    "HubConnectionError",
    "IncompatibleCheckpointError",
    "InvalidArgumentError",
    "UnknownOptionError",
    "InvalidTileError",
    "OptionalDependencyError",
    "EvaluationInputError",
    "SlideError",
    "SettingsMismatchError",
    "OutputNotWritableError",
    "ExportValidationError",
]
