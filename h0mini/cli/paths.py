"""Output paths named in command-line words, checked before anything heavy loads."""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputNotWritableError


def check_output_file(path: Path, option: str) -> None:
    """``-o FILE``: not a folder, and no file where one of its folders should be."""
    if path.is_dir():
        raise OutputNotWritableError(
            f"{option} {str(path)!r} is a folder, but {option} names the output file: name a file inside it, "
            f"e.g. {option} {str(path / 'features.h5')!r}"
        )
    _no_file_in_the_way(path, option)


def check_output_folder(path: Path, option: str) -> None:
    """``-o DIR``: not a file, and no file where one of its parent folders should be."""
    if path.exists() and not path.is_dir():
        raise OutputNotWritableError(f"{option} {str(path)!r} is a file, but {option} names a folder: "
                                     "name a folder (it is created)")
    _no_file_in_the_way(path, option)


def _no_file_in_the_way(path: Path, option: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputNotWritableError(
                    f"{option} {str(path)!r}: {str(parent)!r} is a file, not a folder, so nothing can be written "
                    "inside it; choose another path"
                )
            return
