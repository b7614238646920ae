"""``embed_to_file()``: embed many tiles into one output file, resumably, in bounded memory.

Finished batches are saved as part files in ``OUT.parts/``, each written atomically under a name
unique to its writer (host, pid, random), so a killed run loses at most the batches since the
last part and two writers never overwrite each other. A rerun with the same settings embeds only
the tiles still missing; one with other settings stops and names what differs
(``overwrite=True`` replaces). The output is assembled from the parts (and an earlier complete
output) one part at a time, written atomically, and only when every tile is in hand: an output
never holds fewer rows than its tiles, whoever else writes to the folder.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import atomic_path, remove_stale_temp
from .embed import TileEmbedder, make_progress
from .errors import InvalidArgumentError, InvalidTileError, MissingRowsError, SettingsMismatchError, shown
from .model import weights_fingerprint
from .tiles import LazyTile, TileInput, TileRef, expand_path
from .version import __version__
from .writers import (Embeddings, RowBlocks, check_format, check_writable, raise_if_disk_full, read_embeddings,
                      read_provenance, write_embeddings)

logger = logging.getLogger(__name__)

_KEPT = "the finished batches were kept in {parts!r}: free some space and rerun the same command to resume"
_COORDS_IN_NAME = (re.compile(r"(?:^|[_-])x(\d+)[_-]y(\d+)(?:$|[_-])"), re.compile(r"^(\d+)_(\d+)$"))

# What changes the numbers: a saved output or parts count for a rerun only when these agree.
SAME_NUMBERS = ("weights_sha256", "arch", "output", "precision", "weights_dtype", "preprocessing", "tiling", "slide")


def differences(saved: Dict[str, Any], settings: Dict[str, Any], keys: Sequence[str] = SAME_NUMBERS
                ) -> Dict[str, Tuple[Any, Any]]:
    """The settings among ``keys`` that differ between a saved provenance and this run's.

    Within ``tiling``, each sub-key is compared and named on its own (``tiling.read_level``).
    """
    found: Dict[str, Tuple[Any, Any]] = {}
    for key in keys:
        old, new = _plain(saved.get(key)), _plain(settings.get(key))
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                if old.get(sub) != new.get(sub):
                    found[f"{key}.{sub}"] = (old.get(sub), new.get(sub))
        else:
            found[key] = (old, new)
    return found


def _plain(value: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so that saved and fresh values compare."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


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
    overwrite: bool = False,
    extra_provenance: Optional[Dict[str, Any]] = None,
    slide: Optional[Dict[str, Any]] = None,
) -> JobResult:
    """Embed the tiles named by ``inputs`` into ``output_path`` (.h5, .npy, .pt or .parquet).

    Whole slides pass their tiles (``LazyTile``s) with ``tiling`` (how the slide was tiled: part of
    the resume key), the ``coords_attrs`` TRIDENT/CLAM readers expect, ``slide_pool="mean"`` for a
    slide-level vector, and ``progress_label`` for a bar that names the slide and goes away when it
    is done. Saved work made with other settings raises ``SettingsMismatchError`` unless
    ``overwrite``.
    """
    output_path = Path(output_path)
    check_format(output_path, embedder.output)
    check_writable(output_path)
    if slide_pool not in (None, "mean"):
        raise InvalidArgumentError(f"slide_pool must be None or 'mean', got {slide_pool!r}", argument="slide_pool",
                                   accepted="None, 'mean'")
    refs = gather_tiles(inputs)
    settings = run_settings(embedder, tiling)
    if slide is not None:
        settings["slide"] = slide  # the slide file's fingerprint: a rescanned slide is not "done"
    job = OutputJob(output_path, settings, embedder, overwrite=overwrite)
    done = job.saved_names()
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
                job.add([tile_key(pending[i]) for i in batch.indices], batch.features, part_size)
                skipped.extend(
                    {"index": position[s.source], "path": s.source, "reason": s.reason} for s in batch.skipped
                )
                bar.update(len(batch.indices) + len(batch.skipped))
    except InvalidTileError as error:
        job.flush()  # keep what was done: a rerun resumes from here
        if error.source in position:  # name the tile by its place in the user's input, not in this run's
            raise InvalidTileError(error.reason, index=position[error.source], source=error.source) from None
        raise
    except OSError as error:
        raise_if_disk_full(error, job.parts.folder, _KEPT.format(parts=str(job.parts.folder)))
        raise
    except BaseException:
        job.flush()
        raise
    bad = {s["path"] for s in skipped}
    kept = [r for r in refs if tile_key(r) not in bad]
    coords = coords_of(kept)
    if coords is None and tiling is not None:
        coords = np.zeros((0, 2), np.int64)
    job.finish([tile_key(r) for r in kept], coords, skipped, coords_attrs=coords_attrs, slide_pool=slide_pool,
               extra_provenance=extra_provenance)
    return JobResult(output_path, embedded=len(kept) - reused, reused=reused, skipped=skipped)


def run_settings(embedder: TileEmbedder, tiling: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    settings = job_settings(embedder)
    if tiling is not None:
        settings["tiling"] = tiling
    return settings


def job_settings(embedder: TileEmbedder) -> Dict[str, Any]:
    """Everything that changes the numbers, plus versions: the provenance, and the key for resuming."""
    import timm
    import torch

    weights = getattr(embedder.model, "h0mini_weights", None)
    return {
        "h0mini_version": __version__,
        "timm_version": str(timm.__version__),
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass h5py cannot store
        **(weights.as_dict() if weights is not None else _in_memory_weights(embedder.model)),
        "output": embedder.output,
        "precision": embedder.precision,
        "weights_dtype": str(embedder.weights_dtype).replace("torch.", ""),
        "preprocessing": embedder.preprocessing.describe(),
        # Recorded, not a resume key: nvJPEG's pixels differ from Pillow's by a level here and there,
        # below bf16's noise, and on a CPU the two decoders agree exactly.
        "jpeg_decode": embedder.jpeg_decode,
    }


def _in_memory_weights(model: Any) -> Dict[str, Any]:
    """A model not loaded by ``load_model`` (fine-tuned, ``timm.create_model``): named by its weights."""
    return {"weights": "in-memory model", "arch": type(model).__name__, "weights_sha256": weights_fingerprint(model)}


class OutputJob:
    """One output file being made: its saved parts, an earlier complete output, and the final write."""

    def __init__(self, path: Path, settings: Dict[str, Any], embedder: TileEmbedder, *, overwrite: bool = False):
        self.path = Path(path)
        self.settings = settings
        self.embedder = embedder
        self.names = ["cls", "registers", "patch_tokens"] if embedder.output == "all" else [embedder.output]
        self.parts = PartStore(self.path.with_name(self.path.name + ".parts"), settings)
        self._existing = False
        remove_stale_temp(self.path)  # a writer killed mid-write left its temporary file
        self.parts.remove_stale_temp()
        # overwrite replaces work made with *other* settings; work made with these is kept and
        # resumed, so a rerun with --overwrite (a requeued job script) never redoes finished batches
        parts = self.parts.differences()
        if parts and overwrite:
            self.parts.remove()
        elif parts:
            raise SettingsMismatchError(self.parts.folder, parts)
        if self.path.exists():
            saved = saved_provenance(self.path)
            if saved is not None:
                found = differences(saved, settings)
                if found and not overwrite:
                    raise SettingsMismatchError(self.path, found)
                self._existing = not found

    def saved_names(self) -> Dict[str, Tuple[str, Any]]:
        """Tile name -> where its row is saved: ("part", file) or ("output", row)."""
        where: Dict[str, Tuple[str, Any]] = {}
        if self._existing:
            for row, name in enumerate(read_provenance(self.path, tile_names=True).get("tile_names", [])):
                where[name] = ("output", row)
        for part, names in self.parts.names().items():
            for name in names:
                where[name] = ("part", part)
        return where

    def add(self, names: List[str], features: Dict[str, Any], part_size: int) -> None:
        self.parts.add(names, {k: v.numpy() if hasattr(v, "numpy") else v for k, v in features.items()})
        if self.parts.pending_rows >= part_size:
            self.parts.flush()

    def flush(self) -> None:
        self.parts.flush()

    def finish(self, tile_names: List[str], coords: Optional[np.ndarray], skipped: List[Dict[str, Any]], *,
               coords_attrs: Optional[Dict[str, Any]] = None, slide_pool: Optional[str] = None,
               extra_provenance: Optional[Dict[str, Any]] = None) -> None:
        """Write the output from everything saved, one part at a time, then remove the parts."""
        try:
            self.parts.flush()
        except OSError as error:
            raise_if_disk_full(error, self.parts.folder, _KEPT.format(parts=str(self.parts.folder)))
            raise
        where = self.saved_names()
        missing = [n for n in tile_names if n not in where]
        if missing:
            raise MissingRowsError(self.path, missing)
        position = {name: i for i, name in enumerate(tile_names)}
        shapes = self.embedder.output_shape()
        arrays = {
            name: RowBlocks((len(tile_names), *shapes[name]), np.float32,
                            functools.partial(self._blocks, where, position, name))
            for name in self.names
        }
        pooled = None
        if slide_pool == "mean":
            vector = arrays[self.names[0]]
            pooled = _mean_rows(vector) if len(tile_names) else np.full(vector.shape[1:], np.nan, np.float32)
        if self.embedder.output != "all":
            arrays = {"features": arrays[self.embedder.output]}
        provenance = dict(self.settings, **(extra_provenance or {}),
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          num_tiles=len(tile_names), num_skipped=len(skipped))
        embeddings = Embeddings(arrays, tile_names, coords, provenance, skipped, dict(coords_attrs or {}), pooled)
        try:
            write_embeddings(self.path, embeddings)
        except OSError as error:
            raise_if_disk_full(error, self.path, _KEPT.format(parts=str(self.parts.folder)))
            raise
        self.parts.remove()

    def _blocks(self, where: Dict[str, Tuple[str, Any]], position: Dict[str, int], name: str
                ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(output rows, values) of array ``name``, one saved file at a time."""
        by_file: Dict[Tuple[str, Any], List[str]] = {}
        for tile, (kind, place) in where.items():
            if tile in position:
                by_file.setdefault(("output", None) if kind == "output" else ("part", place), []).append(tile)
        for (kind, place), tiles in by_file.items():
            if kind == "output":
                rows = {t: where[t][1] for t in tiles}
                for start in range(0, len(tiles), 4096):
                    chunk = tiles[start:start + 4096]
                    values = _read_output_rows(self.path, name if self.embedder.output == "all" else "features",
                                               [rows[t] for t in chunk])
                    yield np.array([position[t] for t in chunk], np.int64), values
            else:
                part_names, values = self.parts.read(place, name)
                keep = [i for i, t in enumerate(part_names) if t in position and where[t] == ("part", place)]
                if keep:
                    yield np.array([position[part_names[i]] for i in keep], np.int64), values[keep]


def _mean_rows(rows: RowBlocks) -> np.ndarray:
    total = np.zeros(rows.shape[1:], np.float64)
    for _, values in rows.blocks():
        total += values.astype(np.float64).sum(0)
    return (total / rows.shape[0]).astype(np.float32)


def saved_provenance(path: Path, *, quiet: bool = False) -> Optional[Dict[str, Any]]:
    """The provenance of an existing output (its attributes only), or None when there is none or it
    cannot be read (an unreadable output is rewritten: it holds nothing to keep)."""
    if not path.exists():
        return None
    try:
        return read_provenance(path)
    except Exception as error:
        if not quiet:
            logger.warning("ignoring unreadable existing output %s (%s): it will be rewritten", shown(path), error)
        return None


def _read_output_rows(path: Path, name: str, rows: List[int]) -> np.ndarray:
    if path.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        order = np.argsort(rows)
        with h5py.File(path, "r") as f:
            values = f[name][np.asarray(rows)[order]]
        out = np.empty_like(values)
        out[order] = values
        return out
    return np.asarray(read_embeddings(path).arrays[name])[rows]


class PartStore:
    """``.npz`` part files of finished tiles, each written atomically under a name unique to its writer."""

    def __init__(self, folder: Path, settings: Dict[str, Any]):
        self.folder = folder
        self.settings = settings
        self._names: List[str] = []
        self._arrays: Dict[str, List[np.ndarray]] = {}
        self._tag = f"{_safe(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(3)}"
        self._count = 0

    @property
    def pending_rows(self) -> int:
        return len(self._names)

    def differences(self) -> Dict[str, Tuple[Any, Any]]:
        """The settings the saved parts were made with otherwise (empty: none saved, or the same)."""
        saved = self.saved_settings()
        return {} if saved is None else differences(saved, self.settings)

    def saved_settings(self) -> Optional[Dict[str, Any]]:
        """The settings the saved parts were made with, or None when there are none."""
        try:
            return json.loads((self.folder / "settings.json").read_text())
        except (OSError, ValueError):
            return None

    def files(self) -> List[Path]:
        try:
            return sorted(p for p in self.folder.iterdir() if p.name.startswith("part-") and p.suffix == ".npz")
        except FileNotFoundError:
            return []

    def names(self) -> Dict[Path, List[str]]:
        """Tile names of each saved part (only the names are read)."""
        found: Dict[Path, List[str]] = {}
        for part in self.files():
            try:
                with np.load(part) as data:
                    found[part] = [str(n) for n in data["tile_names"]]
            except Exception as error:  # cannot happen with atomic writes, but never trust a disk
                logger.warning("ignoring unreadable part %s (%s)", shown(part), error)
        return found

    def read(self, part: Path, name: str) -> Tuple[List[str], np.ndarray]:
        with np.load(part) as data:
            return [str(n) for n in data["tile_names"]], data[name]

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
                tmp.write_text(json.dumps(self.settings, default=str))
        self._count += 1
        with atomic_path(self.folder / f"part-{self._tag}-{self._count:06d}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, tile_names=np.array(self._names), **{k: np.concatenate(v) for k, v in self._arrays.items()})
        self._names, self._arrays = [], {}

    def remove_stale_temp(self) -> None:
        """Delete the temporary files of part writers that were killed."""
        for leftover in list(self.folder.glob(".part-*.tmp")) if self.folder.exists() else []:
            final = self.folder / leftover.name[1:].rsplit(".", 2)[0]
            remove_stale_temp(final)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)[:40] or "host"
