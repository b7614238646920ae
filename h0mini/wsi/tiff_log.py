"""tifffile's complaints about a damaged file, kept out of the log: the slide's error says it in one line.

A filter on the ``tifffile`` logger, switched per thread: the planner thread probing one slide never
silences a user's tifffile elsewhere, and nothing touches the logger's level (setting ``Logger.level``
directly is not seen by the logger's cache of enabled levels, and ``setLevel`` is process-wide).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator, List

_local = threading.local()


class _Collect(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_local, "notes", None)
        if notes is None:
            return True
        notes.append(" ".join(record.getMessage().split()))
        return False


_FILTER = _Collect()


@contextmanager
def tifffile_notes() -> Iterator[List[str]]:
    """Inside the block, this thread's tifffile log records go into the list yielded, not the log."""
    logger = logging.getLogger("tifffile")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    previous = getattr(_local, "notes", None)
    _local.notes = notes = []
    try:
        yield notes
    finally:
        _local.notes = previous
