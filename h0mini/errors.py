"""Every error h0mini raises on purpose.

Each class also derives from the builtin a caller would naturally catch
(``PermissionError`` for access, ``FileNotFoundError`` for missing things,
``ValueError`` for bad input), so ``except FileNotFoundError`` keeps working.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple


def shown(name: object) -> str:
    """A file name as printed: as is when plain, else escaped like ``repr``, so that a name holding a
    newline or a terminal escape code cannot forge a line (``error: ...``) or recolour the terminal."""
    text = str(name)
    return text if text.isprintable() else repr(text)


class H0miniError(Exception):
    """Base class of all h0mini errors."""


class GatedModelError(H0miniError, PermissionError):
    """The Hub refused access: no token, a wrong token, or access not yet approved."""

    def __init__(self, message: str, *, repo_id: str):
        super().__init__(message)
        self.repo_id = repo_id


class ModelNotFoundError(H0miniError, FileNotFoundError):
    """A Hub repository, a file in it, or a local path does not exist."""

    def __init__(self, message: str, *, name: str):
        super().__init__(message)
        self.name = name


class RevisionNotFoundError(ModelNotFoundError):
    """The repository exists but the requested branch, tag or commit does not."""

    def __init__(self, message: str, *, name: str, revision: str):
        super().__init__(message, name=name)
        self.revision = revision


class WeightsNotCachedError(H0miniError, FileNotFoundError):
    """The Hub cannot be reached (offline mode or no network) and nothing is cached."""

    def __init__(self, message: str, *, repo_id: str):
        super().__init__(message)
        self.repo_id = repo_id


class HubConnectionError(H0miniError, ConnectionError):
    """The Hub answered with an error that is neither access nor a missing file (5xx, proxy)."""


class InvalidArgumentError(H0miniError, ValueError, TypeError):
    """An argument got a value it cannot take (``precision="fp8"``, ``batch_size=0``, ``model=42``); the
    message names the argument and the accepted values.

    Also a ``TypeError``, so that code catching what Python raises for a wrong type keeps working.
    ``argument`` is the argument's name and ``accepted`` the values it takes, where the raiser says.
    """

    def __init__(self, message: str, *, argument: Optional[str] = None, accepted: Optional[str] = None):
        super().__init__(message)
        self.argument = argument
        self.accepted = accepted

    def __reduce__(self):
        return (_rebuild_invalid_argument, (type(self), str(self), self.argument, self.accepted))


def _rebuild_invalid_argument(cls: type, message: str, argument: Optional[str], accepted: Optional[str]):
    return cls(message, argument=argument, accepted=accepted)


class UnknownOptionError(InvalidArgumentError):
    """A keyword a function does not take (``embed_tiles(devise="cpu")``); the message lists the valid ones."""


class IncompatibleCheckpointError(H0miniError, ValueError):
    """A checkpoint's tensors do not fit the architecture they are loaded into."""


class InvalidTileError(H0miniError, ValueError):
    """A tile could not be read or is not an image h0mini can embed.

    ``index`` is its position in the input, ``source`` its path when it has one.
    """

    def __init__(self, message: str, *, index: Optional[int] = None, source: Optional[str] = None):
        where = []
        if index is not None:
            where.append(f"tile {index}")
        if source is not None:
            where.append(repr(str(source)))
        prefix = f"{' '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.index = index
        self.source = source
        self.reason = message

    def __reduce__(self):
        return (_rebuild_invalid_tile, (self.reason, self.index, self.source))


def _rebuild_invalid_tile(reason: str, index: Optional[int], source: Optional[str]) -> InvalidTileError:
    return InvalidTileError(reason, index=index, source=source)


class OptionalDependencyError(H0miniError, ImportError):
    """A feature needs a package that the base install leaves out."""

    def __init__(self, package: str, *, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the package {package!r}, which is not installed. "
            f"Install it with: pip install 'h0mini[{extra}]' (from a clone of the repository, in its folder: "
            f"pip install '.[{extra}]')"
        )
        self.package = package
        self.extra = extra


class EvaluationInputError(H0miniError, ValueError):
    """Input to ``h0mini.eval`` is unusable: mismatched tile counts or coordinates between slides,
    NaN features, an unparsable slide name, an empty pair group, bad labels or settings.

    The message names the slide or field, e.g. ``slide 'GIVH_AT2' has 8138 tiles but slide
    'GIV_AT2' has 8139``.
    """


class OutputNotWritableError(H0miniError, PermissionError):
    """An output file or folder cannot be written (read-only, missing permissions, a file in the way)."""


class SlideError(H0miniError, ValueError):
    """A whole-slide image cannot be opened, read or tiled as asked.

    ``slide`` is the slide's path (or a description of the reader object). The message says
    what went wrong and what to pass instead, e.g. ``'scan.tif': no µm/px in the slide's
    metadata; pass mpp=0.25 (Python) or --mpp 0.25 (command line) if you know it``.
    """

    def __init__(self, message: str, *, slide: Optional[str] = None):
        super().__init__(f"{slide!r}: {message}" if slide is not None else message)
        self.slide = slide
        self.reason = message

    def __reduce__(self):
        return (_rebuild_slide_error, (self.reason, self.slide))


def _rebuild_slide_error(reason: str, slide: Optional[str]) -> SlideError:
    return SlideError(reason, slide=slide)


class ExportValidationError(H0miniError, ValueError):
    """An ONNX export failed a bar (fp32 parity, or the int8 gate); nothing was written.

    ``failed`` lists the bars that failed, e.g. ``int8 min CLS cosine 0.98123 < 0.995``.
    """

    def __init__(self, failed, figures: str):
        self.failed = list(failed)
        self.figures = figures
        super().__init__(f"export refused, nothing written: {'; '.join(self.failed)}. Figures: {figures}")

    def __reduce__(self):
        return (type(self), (self.failed, self.figures))


class SettingsMismatchError(H0miniError, ValueError):
    """Saved work (an output or its parts) was made with other settings than this run's.

    Nothing is deleted: the message names each setting that differs, with both values, and says
    how to replace the saved work (``overwrite=True``, ``--overwrite``) or keep it (rerun as before).
    """

    def __init__(self, path: Any, differences: Dict[str, Tuple[Any, Any]]):
        self.path = path
        self.differences = differences
        listed = "; ".join(f"{key}: saved {_short(old)}, now {_short(new)}" for key, (old, new) in differences.items())
        from .wording import say

        super().__init__(
            f"{shown(path)} was made with other settings ({listed}). Nothing was deleted: rerun with the saved "
            f"settings to resume, or {say('pass overwrite=True', 'add --overwrite')} to replace it"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class MissingRowsError(H0miniError, RuntimeError):
    """Tiles expected in the output are in no saved part (another process removed them?): nothing is written."""

    def __init__(self, path: Any, missing: List[str]):
        self.missing = missing
        super().__init__(f"{shown(path)}: {len(missing)} tile(s) are in no saved part (first: {missing[0]!r}); "
                         "nothing was written. Rerun to embed them")
