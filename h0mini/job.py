"""``embed_to_file()``: embed many tile files into one output file, resumably.

Finished batches are saved as numbered part files in ``OUT.parts/`` (each written
atomically), so a killed run loses at most the batches since the last part. A
rerun with the same settings reads the parts (and an existing complete output),
embeds only the tiles still missing, then writes the output atomically and
removes the parts.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .embed import TileEmbedder, make_progress
from .errors import InvalidTileError, shown
from .tiles import LazyTile, TileInput, TileRef, expand_path
from .version import __version__
from .writers import (Embeddings, atomic_path, check_format, check_writable, raise_if_disk_full, read_embeddings,
                      write_embeddings)

logger = logging.getLogger(__name__)

_KEPT = "the finished batches were kept in {parts!r}: free some space and rerun the same command to resume"
_COORDS_IN_NAME = (re.compile(r"(?:^|[_-])x(\d+)[_-]y(\d+)(?:$|[_-])"), re.compile(r"^(\d+)_(\d+)$"))


@dataclass
class JobResult:
    output: Path
    embedded: int  # tiles embedded in this run
    reused: int  # tiles taken from an earlier, interrupted or complete, run
    skipped: List[Dict[str, Any]]


def gather_tiles(inputs: Sequence[Union[str, Path, TileRef, LazyTile]]) -> List[Union[TileRef, LazyTile]]:
    """Tiles from every input (file, folder, glob, list file, or tiles already named), in order, each once."""
    refs: List[Union[TileRef, LazyTile]] = []
    seen: Dict[str, str] = {}
    for spec in inputs:
        for ref in [spec] if isinstance(spec, (TileRef, LazyTile)) else expand_path(spec):
            key = tile_key(ref)
            if key in seen:
                raise InvalidTileError(f"listed twice (by {seen[key]!r} and {str(spec)!r})", source=key)
            seen[key] = key if isinstance(spec, LazyTile) else str(spec)
            refs.append(ref)
    return refs


def tile_key(ref: Union[TileRef, LazyTile]) -> str:
    """What names a tile in outputs, errors and resumes: its path, or a slide tile's name."""
    return ref.name if isinstance(ref, LazyTile) else ref.path


def coords_of(refs: Sequence[TileRef]) -> Optional[np.ndarray]:
    """Pixel coords from list files, or from names like ``slide_x1120_y896.png`` / ``1120_896.png``."""
    coords = []
    for ref in refs:
        if ref.coords is not None:
            coords.append(ref.coords)
            continue
        stem = Path(tile_key(ref)).stem
        match = next((m for m in (p.search(stem) for p in _COORDS_IN_NAME) if m), None)
        if match is None:
            return None
        coords.append((int(match.group(1)), int(match.group(2))))
    return np.asarray(coords, dtype=np.int64).reshape(-1, 2)


def embed_to_file(
    inputs: Sequence[Union[str, Path, TileRef, LazyTile]],
    output_path: Union[str, Path],
    embedder: TileEmbedder,
    *,
    on_error: str = "raise",
    part_size: int = 1024,
    progress: Optional[bool] = None,
    tiling: Optional[Dict[str, Any]] = None,
    coords_attrs: Optional[Dict[str, Any]] = None,
    slide_pool: Optional[str] = None,
    progress_label: Optional[str] = None,
) -> JobResult:
    """Embed the tiles named by ``inputs`` into ``output_path`` (.h5, .npy, .pt or .parquet).

    Whole slides pass their tiles (``LazyTile``s) with ``tiling`` (how the slide was tiled: part of
    the resume key, so a rerun with other tiling settings starts afresh), the ``coords_attrs``
    TRIDENT/CLAM readers expect, ``slide_pool="mean"`` for a slide-level vector, and
    ``progress_label`` for a bar that names the slide and goes away when it is done.
    """
    output_path = Path(output_path)
    check_format(output_path, embedder.output)
    check_writable(output_path)
    if slide_pool not in (None, "mean"):
        raise ValueError(f"slide_pool must be None or 'mean', got {slide_pool!r}")
    refs = gather_tiles(inputs)
    settings = job_settings(embedder)
    if tiling is not None:
        settings["tiling"] = tiling
    parts = PartStore(output_path.with_name(output_path.name + ".parts"), settings)
    done = parts.load()
    done.update(_complete_output(output_path, settings))
    pending = [r for r in refs if tile_key(r) not in done]
    reused = len(refs) - len(pending)
    if reused:
        logger.info("resuming: %d of %d tiles already embedded", reused, len(refs))
    skipped: List[Dict[str, Any]] = []
    position = {tile_key(r): i for i, r in enumerate(refs)}
    stays = any(getattr(getattr(r, "source", None), "in_process_only", False) for r in pending)
    source = TileInput(pending, single=False, length=len(pending), all_paths=not stays, in_process_only=stays)
    try:
        label = {"desc": progress_label, "leave": False} if progress_label else {}
        with make_progress(progress, total=len(pending), **label) as bar:
            for batch in embedder.iter_batches(source, on_error=on_error):
                names = [tile_key(pending[i]) for i in batch.indices]
                parts.add(names, {k: v.numpy() for k, v in batch.features.items()})
                if parts.pending_rows >= part_size:
                    parts.flush()
                skipped.extend(
                    {"index": position[s.source], "path": s.source, "reason": s.reason} for s in batch.skipped
                )
                bar.update(len(batch.indices) + len(batch.skipped))
    except InvalidTileError as error:
        parts.flush()  # keep what was done: a rerun resumes from here
        if error.source in position:  # name the tile by its place in the user's input, not in this run's
            raise InvalidTileError(error.reason, index=position[error.source], source=error.source) from None
        raise
    except OSError as error:
        raise_if_disk_full(error, parts.folder, _KEPT.format(parts=str(parts.folder)))
        raise
    except BaseException:
        parts.flush()
        raise
    try:
        parts.flush()
    except OSError as error:
        raise_if_disk_full(error, parts.folder, _KEPT.format(parts=str(parts.folder)))
        raise
    done.update(parts.load())
    kept = [r for r in refs if tile_key(r) in done]
    shapes = embedder.output_shape()
    names = ["cls", "registers", "patch_tokens"] if embedder.output == "all" else [embedder.output]
    arrays = {
        name: np.stack([done[tile_key(r)][name] for r in kept]) if kept else np.zeros((0, *shapes[name]), np.float32)
        for name in names
    }
    if embedder.output != "all":
        arrays = {"features": arrays[embedder.output]}
    provenance = dict(settings, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), num_tiles=len(kept))
    pooled = None
    if slide_pool == "mean":
        rows = arrays.get("features", arrays.get("cls"))
        pooled = rows.mean(0).astype(np.float32) if len(rows) else np.full(rows.shape[1:], np.nan, np.float32)
    coords = coords_of(kept)
    if coords is None and tiling is not None:
        coords = np.zeros((0, 2), np.int64)
    embeddings = Embeddings(arrays, [tile_key(r) for r in kept], coords, provenance, skipped,
                            dict(coords_attrs or {}), pooled)
    try:
        write_embeddings(output_path, embeddings)
    except OSError as error:
        raise_if_disk_full(error, output_path, _KEPT.format(parts=str(parts.folder)))
        raise
    parts.remove()
    return JobResult(output_path, embedded=len(kept) - reused, reused=reused, skipped=skipped)


def job_settings(embedder: TileEmbedder) -> Dict[str, Any]:
    """Everything that changes the numbers, plus versions: the provenance, and the key for resuming."""
    import timm
    import torch

    weights = getattr(embedder.model, "h0mini_weights", None)
    return {
        "h0mini_version": __version__,
        "timm_version": str(timm.__version__),
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass h5py cannot store
        **(weights.as_dict() if weights is not None else {"weights": "in-memory model"}),
        "output": embedder.output,
        "precision": embedder.precision,
        "weights_dtype": str(embedder.weights_dtype).replace("torch.", ""),
        "preprocessing": embedder.preprocessing.describe(),
        # Recorded, not a resume key: nvJPEG's pixels differ from Pillow's by a level here and there,
        # below bf16's noise, and on a CPU the two decoders agree exactly.
        "jpeg_decode": embedder.jpeg_decode,
    }


_SAME_NUMBERS = ("weights_sha256", "arch", "output", "precision", "weights_dtype", "preprocessing", "tiling")


def _same_numbers(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _SAME_NUMBERS) and "weights_sha256" in a


def _complete_output(path: Path, settings: Dict[str, Any]) -> Dict[str, Dict[str, np.ndarray]]:
    """Rows of an existing output made with the same settings (so added tiles extend it)."""
    if not path.exists():
        return {}
    try:
        existing = read_embeddings(path)
    except Exception as error:
        logger.warning("ignoring unreadable existing output %s (%s): it will be rewritten", shown(path), error)
        return {}
    if not _same_numbers(existing.provenance, settings):
        logger.warning("existing %s was made with other settings: it will be replaced", shown(path))
        return {}
    name_map = {"features": settings["output"]}
    return {
        name: {name_map.get(k, k): v[i] for k, v in existing.arrays.items()}
        for i, name in enumerate(existing.tile_names)
    }


class PartStore:
    """Numbered ``.npz`` part files of finished tiles, each written atomically."""

    def __init__(self, folder: Path, settings: Dict[str, Any]):
        self.folder = folder
        self.settings = settings
        self._names: List[str] = []
        self._arrays: Dict[str, List[np.ndarray]] = {}
        self._written_by_this_run = False  # then its settings are ours, even for an unverifiable in-memory model

    @property
    def pending_rows(self) -> int:
        return len(self._names)

    def load(self) -> Dict[str, Dict[str, np.ndarray]]:
        """Rows saved by earlier runs with the same settings, by tile name."""
        settings_file = self.folder / "settings.json"
        if not settings_file.exists():
            return {}
        try:
            saved = json.loads(settings_file.read_text())
        except ValueError:
            saved = {}
        if not self._written_by_this_run and not _same_numbers(saved, self.settings):
            logger.warning("%s was made with other settings: starting again", shown(self.folder))
            shutil.rmtree(self.folder)
            return {}
        rows: Dict[str, Dict[str, np.ndarray]] = {}
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part) as data:
                    names = [str(n) for n in data["tile_names"]]
                    arrays = {k: data[k] for k in data.files if k != "tile_names"}
            except Exception as error:  # cannot happen with atomic writes, but never trust a disk
                logger.warning("ignoring unreadable part %s (%s)", shown(part), error)
                continue
            for i, name in enumerate(names):
                rows[name] = {k: v[i] for k, v in arrays.items()}
        return rows

    def add(self, names: List[str], arrays: Dict[str, np.ndarray]) -> None:
        self._names.extend(names)
        for key, value in arrays.items():
            self._arrays.setdefault(key, []).append(value)

    def flush(self) -> None:
        if not self._names:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.exists():
            with atomic_path(settings_file) as tmp:
                tmp.write_text(json.dumps(self.settings))
        self._written_by_this_run = True
        number = len(list(self.folder.glob("part-*.npz"))) + 1
        with atomic_path(self.folder / f"part-{number:06d}-{int(time.time())}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, tile_names=np.array(self._names), **{k: np.concatenate(v) for k, v in self._arrays.items()})
        self._names, self._arrays = [], {}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
