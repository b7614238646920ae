"""``summary.csv``: one row per slide of an output folder, across runs, processes and machines.

Each process updates the rows of the slides it finished, under an exclusive ``flock`` on
``.summary.lock`` (read, merge, atomic rename), so concurrent writers never lose each other's
rows. A row says what became of the slide the last time anyone looked, except that a slide's
"done" row (when, where, how long) is never replaced by a later "already done" or "claimed by
another process".
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Iterator, List

from ..atomic import atomic_path

logger = logging.getLogger(__name__)

SUMMARY = "summary.csv"
DONE, ALREADY_DONE, FAILED, CLAIMED = "done", "already done", "failed", "claimed by another process"


@dataclass
class SlideStatus:
    """What became of one slide in a run: a row of ``summary.csv``."""

    slide: str
    status: str  # "done", "already done", "failed", "claimed by another process"
    tiles: int = 0
    skipped_tiles: int = 0
    seconds: float = 0.0
    output: str = ""
    qc: str = ""
    error: str = ""
    name: str = ""
    host: str = ""
    pid: int = 0
    finished: str = ""  # UTC, ISO 8601


FIELDS = tuple(f.name for f in fields(SlideStatus))


def read_summary(path: Path) -> Dict[str, Dict[str, str]]:
    """The rows of a summary file by slide name (``name``, else the slide path)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows[row.get("name") or row.get("slide", "")] = row
    return rows


def update_summary(output_dir: Path, statuses: List[SlideStatus]) -> Path:
    """Merge ``statuses`` into ``OUTPUT_DIR/summary.csv`` (created if missing, even with no rows)."""
    path = Path(output_dir) / SUMMARY
    with _locked(Path(output_dir) / ".summary.lock"):
        rows = read_summary(path)
        for status in statuses:
            key = status.name or status.slide
            old = rows.get(key)
            if old is not None and (status.status == CLAIMED and old.get("status") != CLAIMED
                                    or status.status == ALREADY_DONE and old.get("status") == DONE):
                continue  # the row of the run that embedded it says more (when, where, how long)
            rows[key] = {k: str(getattr(status, k)) for k in FIELDS}
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(rows):
            writer.writerow({k: rows[key].get(k, "") for k in FIELDS})
        with atomic_path(path) as tmp:
            tmp.write_text(buffer.getvalue())
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: one process per folder
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks: rows may race, outputs never do
            logger.debug("no lock on %s (%s)", path, error)
        yield
    finally:
        os.close(fd)
