"""Ctrl-C ends the ``h0mini`` command with one line, ``interrupted``, and exit status 130, at any moment.

While the command's modules import (torch takes seconds) and while the interpreter shuts down,
there is nothing to save: the handler prints the line and exits at once. While a command runs,
Ctrl-C raises ``KeyboardInterrupt`` as usual, so finished batches are saved on the way out.
Only the command's own process is touched: ``import h0mini`` in a user's program changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, List, Tuple

EXIT_STATUS = 130  # 128 + SIGINT, as shells report it


def exit_interrupted(signum: int = signal.SIGINT, frame: object = None) -> None:
    """Print ``interrupted`` and leave now (signal handler; nothing else to clean up at this stage)."""
    try:
        os.write(2, b"interrupted\n")
    finally:
        os._exit(EXIT_STATUS)


def exit_on_interrupt() -> None:
    """From now on Ctrl-C exits at once with one line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, exit_interrupted)


def raise_on_interrupt() -> None:
    """From now on Ctrl-C raises ``KeyboardInterrupt`` (Python's default), for the command to handle."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def started_as_command() -> bool:
    """True in the process of the ``h0mini`` console script or of ``python -m h0mini``, nowhere else.

    The console script runs ``_h0mini_command.main``, which says so before importing h0mini;
    ``python -m h0mini`` is read from the interpreter's own arguments. A user's script or folder
    named ``h0mini`` is neither: its Ctrl-C stays Python's.
    """
    launcher = sys.modules.get("_h0mini_command")
    if launcher is not None and getattr(launcher, "RUNNING", False):
        return True
    original = list(getattr(sys, "orig_argv", []))[1:]  # Python 3.10+; the interpreter's options, then -m NAME
    return "-m" in original and original[original.index("-m") + 1:][:1] == ["h0mini"]


@contextmanager
def signals_held(signums: Tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block are delivered when it ends, not in its middle.

    For clean-up that must run whole: saving finished batches, giving back claims. A second
    Ctrl-C, or a scheduler's SIGTERM after the first, would otherwise cut it short. Outside the
    main thread (where Python runs no handlers) the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[int] = []
    previous = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is None:  # installed outside Python: leave it alone
            continue
        previous[signum] = signal.signal(signum, lambda number, frame: arrived.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raised = None
        for signum in dict.fromkeys(arrived):  # each one: a Ctrl-C's KeyboardInterrupt must not swallow a SIGTERM
            try:
                signal.raise_signal(signum)
            except BaseException as error:  # noqa: BLE001 - re-raised below, the last one's
                raised = error
        if raised is not None:
            raise raised
