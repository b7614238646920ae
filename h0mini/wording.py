"""Name an option the way the reader types it: ``--weights DIR`` on the command line, ``weights=`` in Python.

Library code raises the same error classes for both audiences; only the words differ.
The ``h0mini`` command switches to command-line words for the length of a run with
``command_line_words()``; everything else (scripts, notebooks) reads Python words.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_COMMAND_LINE = contextvars.ContextVar("h0mini_command_line_words", default=False)


def say(python: str, cli: str) -> str:
    """``cli`` inside the ``h0mini`` command, ``python`` everywhere else."""
    return cli if _COMMAND_LINE.get() else python


@contextlib.contextmanager
def command_line_words() -> Iterator[None]:
    """Messages raised inside this block name command-line options (the ``h0mini`` command's ``main``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)
