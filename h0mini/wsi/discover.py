"""Which slides a run embeds: files, folders and globs in, slide paths out, each once, sorted.

Slide discovery is kept apart from embedding so that what counts as *one slide* (a file, or a
DICOM folder) is decided in one place.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, Sequence, Union

from ..errors import SlideError
from ..tiles import GLOB_CHARS, SLIDE_SUFFIXES


def find_slides(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Slide files from files, folders (their slide files, not recursive) and globs, sorted, each once."""
    found: List[str] = []
    for spec in inputs:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not files:
                raise SlideError(f"the folder holds no slide files ({', '.join(sorted(SLIDE_SUFFIXES))})", slide=text)
            found.extend(files)
        elif path.is_file():
            found.append(str(path))
        elif any(c in text for c in GLOB_CHARS):
            files = sorted(m for m in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(m))
            if not files:
                raise SlideError("the pattern matches no files", slide=text)
            found.extend(files)
        else:
            raise SlideError("no such file, folder or pattern", slide=text)
    unique = sorted(dict.fromkeys(os.path.abspath(f) for f in found))
    return unique
