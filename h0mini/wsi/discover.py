"""Which slides a run embeds: files, folders and globs in, slide paths out, each once, sorted.

Slide discovery is kept apart from embedding so that what counts as *one slide* is decided in one
place: a slide file, or a DICOM WSI, which is a folder of ``.dcm`` instance files (one per level,
plus label and overview), read by OpenSlide 4 from any of them. So a folder holding ``.dcm`` files
is one slide, a folder of such folders (the usual DICOM export) is one slide per subfolder, and a
``.dcm`` path stands for its folder (a glob over a series counts it once).
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import List, Sequence, Union

from ..errors import SlideError
from ..tiles import GLOB_CHARS, SLIDE_SUFFIXES

DICOM_SUFFIX = ".dcm"

logger = logging.getLogger(__name__)


def is_dicom_folder(path: Union[str, os.PathLike]) -> bool:
    """A folder that holds ``.dcm`` files: one DICOM WSI."""
    try:
        return any(p.is_file() and p.suffix.lower() == DICOM_SUFFIX for p in Path(path).iterdir())
    except OSError:
        return False


def slide_path(path: Union[str, os.PathLike]) -> str:
    """The path that stands for the slide ``path`` belongs to: a ``.dcm`` file's folder, else itself."""
    text = os.path.abspath(os.fspath(path))
    if text.lower().endswith(DICOM_SUFFIX) and os.path.isfile(text):
        return os.path.dirname(text)
    return text


def find_slides(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Slides from files, folders (their slide files and DICOM subfolders, not deeper) and globs (see
    ``_glob_slides``), sorted, each once."""
    found: List[str] = []
    for spec in inputs:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            slides = _folder_slides(path)
            if not slides:
                raise SlideError(f"the folder holds no slide files ({', '.join(sorted(SLIDE_SUFFIXES))}) and no "
                                 "DICOM slide folders", slide=text)
            found.extend(slides)
        elif path.is_file():
            found.append(str(path))
        elif any(c in text for c in GLOB_CHARS):
            found.extend(_glob_slides(text))
        else:
            raise SlideError("no such file, folder or pattern", slide=text)
    return sorted(dict.fromkeys(slide_path(f) for f in found))


def _glob_slides(pattern: str) -> List[str]:
    """The slides a pattern matches: slide files, DICOM folders, and files of the suffix the pattern names.

    ``slides/*`` also matches the notes, manifests and checksums kept beside the slides; those are
    left out (and counted in a warning) rather than failed one by one. A pattern that names its
    suffix (``*.vsi``) is taken at its word.
    """
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    named = os.path.splitext(pattern)[1].lower()
    named = named if named and not any(c in named for c in GLOB_CHARS) else None
    slides: List[str] = []
    others: List[str] = []
    for match in matches:
        if os.path.isfile(match):
            suffix = os.path.splitext(match)[1].lower()
            (slides if suffix in SLIDE_SUFFIXES or suffix == named else others).append(match)
        elif is_dicom_folder(match):
            slides.append(match)
    if not slides:
        what = f"no slide files ({', '.join(sorted(SLIDE_SUFFIXES))})"
        raise SlideError(f"the pattern matches {what}" + (f"; it matched {_some(others)}" if others else ""),
                         slide=pattern)
    if others:
        what = "1 file that is not a slide" if len(others) == 1 else f"{len(others)} files that are not slides"
        logger.warning("%s: %s left out (%s)", pattern, what, _some(others))
    return sorted(slides)


def _some(paths: List[str], shown: int = 3) -> str:
    names = [os.path.basename(p) for p in paths[:shown]]
    return ", ".join(names) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _folder_slides(folder: Path) -> List[str]:
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES]
    if any(p.suffix.lower() == DICOM_SUFFIX for p in files):
        files = [p for p in files if p.suffix.lower() != DICOM_SUFFIX] + [folder]  # the series is one slide
    dicom = [p for p in entries if p.is_dir() and is_dicom_folder(p)]
    return [str(p) for p in files + dicom]
