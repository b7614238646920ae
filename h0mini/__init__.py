"""h0mini: H0-mini, the distilled pathology foundation model, as a Python package.

``import h0mini`` registers the architectures with timm (``h0_mini``,
``h_optimus_0``, ``h_optimus_1``, ``h0mini_test``) and does nothing else: no
network, no CUDA, no output.
"""

from __future__ import annotations

import logging

from . import interrupt as _interrupt

if _interrupt.started_as_command():  # before torch's seconds of importing: Ctrl-C gives one line, 130
    _interrupt.exit_on_interrupt()

from . import registry as _registry  # noqa: F401  (registers the timm entrypoints)
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
    WeightsNotCachedError,
)
from .embed import SkippedTile, SkippedTilesWarning, TileEmbedder, embed_tiles
from .model import WeightsInfo, load_model
from .wsi import SlideEmbeddings, SlideTiles, embed_slide, embed_slides, tile_slide
from .version import __version__

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
    "H0miniError",
    "GatedModelError",
    "ModelNotFoundError",
    "RevisionNotFoundError",
    "WeightsNotCachedError",
    "HubConnectionError",
    "IncompatibleCheckpointError",
    "InvalidArgumentError",
    "InvalidTileError",
    "OptionalDependencyError",
    "EvaluationInputError",
    "SlideError",
    "SettingsMismatchError",
    "OutputNotWritableError",
    "ExportValidationError",
]
