"""Old option names keep working for one release, and unknown options name the valid ones.

The public functions take ``**options`` only to read deprecated names and to reject the rest
with an error that lists what the function accepts (and the closest valid name), where Python's
own ``TypeError`` would only name the offending keyword. The vocabulary is in the README
("One vocabulary").
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

from .errors import UnknownOptionError

# Every renamed option: old name -> new name, per function (the CLI flags are in h0mini.cli).
RENAMED = {
    "embed_tiles": {"output": "embedding", "dtype": "return_dtype"},
    "TileEmbedder": {"output": "embedding"},
    "embed_slide": {"output": "embedding"},
    "embed_slides": {"output": "embedding"},
    "export_onnx": {"output": "output_dir", "tiles": "calibration"},
}


def warn_renamed(where: str, old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{where}({old}=...) is deprecated and will be removed in the next release: use {new}=... "
        "(same values)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def take_options(
    where: str,
    function: Callable[..., Any],
    options: Dict[str, Any],
    current: Mapping[str, Any],
    *,
    stacklevel: int = 3,
) -> Dict[str, Any]:
    """The values of ``current`` (new name -> value the caller passed or the default), with any
    deprecated spelling in ``options`` read in their place (a ``DeprecationWarning`` each).

    Raises ``UnknownOptionError`` (a ``TypeError`` and a ``ValueError``) for a name that is neither
    a parameter of ``function`` nor a deprecated one, and when a value is passed under both its
    old and its new name.
    """
    values = dict(current)
    renamed = RENAMED.get(where, {})
    defaults = parameter_defaults(function)
    for old in list(options):
        if old not in renamed:
            continue
        new = renamed[old]
        value = options.pop(old)
        if new in values and values[new] != defaults.get(new, values[new]):
            raise UnknownOptionError(f"{where}() got both {old}= (deprecated) and {new}=; pass only {new}=")
        warn_renamed(where, old, new, stacklevel=stacklevel + 1)
        values[new] = value
    if options:
        raise unknown_option(where, sorted(options)[0], valid_options(function))
    return values


def unknown_option(where: str, name: str, valid: Iterable[str]) -> UnknownOptionError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}=?" if close else ""
    return UnknownOptionError(f"{where}() got an unknown option {name!r}.{hint} Valid options: {', '.join(valid)}.")


def parameter_defaults(function: Callable[..., Any]) -> Dict[str, Any]:
    """Default of each named parameter of ``function`` (``inspect.Parameter.empty`` when required)."""
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def valid_options(function: Callable[..., Any]) -> Tuple[str, ...]:
    """Keyword options of ``function`` (its parameters after the positional inputs)."""
    return tuple(
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in ("self",)
    )

