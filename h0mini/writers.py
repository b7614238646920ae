"""Embedding files: .h5 (TRIDENT/CLAM layout), .npy (+ .json sidecar), .pt and .parquet.

Every file is written to a temporary name in the same folder and renamed into
place, so a file under the final name is always complete. Each records its
provenance (versions, weights, revision, sha256, output mode, precision,
preprocessing).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .atomic import atomic_path, remove_stale_temp, temp_name
from .errors import InvalidArgumentError, OptionalDependencyError, OutputNotWritableError
from .wording import say

FORMATS = (".h5", ".hdf5", ".npy", ".pt", ".parquet")
SLIDE_FEATURES = "slide_features"  # the slide-level vector, beside the tile rows
MULTI_ARRAY_OUTPUTS = ("all",)


class RowBlocks:
    """An array written block by block, never held whole: its shape, and blocks of rows that fill it.

    ``blocks()`` yields ``(positions, values)``: the output rows (int64) and their values. Every
    row must be covered once. HDF5 and .npy outputs are filled block by block; .pt and .parquet,
    whose writers need the whole array, build it first.
    """

    def __init__(self, shape: Tuple[int, ...], dtype: Any, blocks: Callable[[], Iterator[Tuple[np.ndarray, np.ndarray]]]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.blocks = blocks

    def __len__(self) -> int:
        return self.shape[0]

    def materialize(self) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        for positions, values in self.blocks():
            array[positions] = values
        return array


def _whole(array: Any) -> np.ndarray:
    return array.materialize() if isinstance(array, RowBlocks) else array


def _fill(target: Any, array: "RowBlocks") -> None:
    """Write the blocks of ``array`` into ``target`` (an h5py dataset or a memmap), in runs of rows."""
    for positions, values in array.blocks():
        order = np.argsort(positions, kind="stable")
        positions, values = positions[order], values[order]
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for run_positions, run_values in zip(np.split(positions, breaks), np.split(values, breaks)):
            if len(run_positions):
                target[int(run_positions[0]):int(run_positions[-1]) + 1] = run_values


@dataclass
class Embeddings:
    """What an embedding file holds: arrays by name, one row per tile, and where they came from."""

    arrays: Dict[str, np.ndarray]  # "features", or "cls"/"registers"/"patch_tokens" for output="all"
    tile_names: List[str]
    coords: Optional[np.ndarray] = None  # (N, 2) int64 pixel x, y when known
    provenance: Dict[str, Any] = field(default_factory=dict)
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    # Whole slides: the attributes TRIDENT/CLAM readers look for on ``coords`` (patch_size_level0, ...)
    # and an optional slide-level vector (e.g. the mean of the tile features).
    coords_attrs: Dict[str, Any] = field(default_factory=dict)
    slide_features: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.tile_names)


def check_format(path: Path, output: str) -> None:
    """Fail before any work when the format cannot hold the output."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgumentError(f"unknown output format {suffix or '(none)'!r} for {str(path)!r}: use one of "
                                   f"{', '.join(FORMATS)}", argument="output_path", accepted=", ".join(FORMATS))
    if output in MULTI_ARRAY_OUTPUTS and suffix in (".npy", ".parquet"):
        raise InvalidArgumentError(f"{say(f'embedding={output!r}', f'--embedding {output}')} holds several arrays: "
                                   f"write it to .h5 or .pt, not {suffix}", argument="output_path", accepted=".h5, .pt")
    if output == "patch_tokens" and suffix == ".parquet":
        raise InvalidArgumentError("patch tokens are 3-D: write them to .h5, .npy or .pt, not .parquet",
                                   argument="output_path", accepted=".h5, .npy, .pt")
    if suffix == ".parquet":
        _pyarrow()  # a missing optional package fails now, not after the embedding


def check_writable(path: Path, *, folder: bool = False) -> None:
    """Fail before any work when the output file ``path`` (a folder with ``folder=True``) cannot be written.

    Creates missing parent folders (as writing would), checks that a file can be created there,
    and removes this output's temporary files left by killed runs.

    Raises:
        OutputNotWritableError: naming the path and the reason (a folder in the way, read-only,
            no permission, a file where a folder should be).
    """
    path = Path(path)
    where = "output folder" if folder else "output file"
    if not folder and path.is_dir():
        raise OutputNotWritableError(f"the {where} {str(path)!r} is a folder; name a file inside it, e.g. "
                                     f"{str(path / 'features.h5')!r}")
    if folder and path.exists() and not path.is_dir():
        raise OutputNotWritableError(f"the {where} {str(path)!r} is a file; name a folder")
    directory = path if folder else path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: probes of processes sharing the folder never meet.
        probe = directory / temp_name("h0mini-write-check")
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.unlink(probe)
    except OSError as error:
        raise OutputNotWritableError(
            f"cannot write the {where} {str(path)!r} ({error.strerror or error}); choose another -o"
        ) from None
    if not folder:
        for target in (path, sidecar(path)):
            remove_stale_temp(target)


def raise_if_disk_full(error: OSError, path: Path, kept: str) -> None:
    """Turn ``No space left on device`` into an error that names ``path`` and what was kept."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutputNotWritableError(
            f"no space left on the device while writing {str(path)!r} ({error.strerror}); {kept}"
        ) from error


def write_embeddings(path: Path, embeddings: Embeddings) -> None:
    path = Path(path)
    suffix = path.suffix.lower()
    writer = {".h5": _write_h5, ".hdf5": _write_h5, ".npy": _write_npy, ".pt": _write_pt, ".parquet": _write_parquet}
    with atomic_path(path) as tmp:
        writer[suffix](tmp, embeddings)
        if suffix == ".npy":
            # The sidecar names the exact .npy it describes (sha256): a run killed between the two
            # renames leaves a pair that reading rejects, never rows under the wrong names.
            metadata = dict(_metadata(embeddings), npy_sha256=_sha256(tmp))
            with atomic_path(sidecar(path)) as meta_tmp:
                meta_tmp.write_text(json.dumps(metadata, indent=1))


def read_embeddings(path: Path) -> Embeddings:
    path = Path(path)
    suffix = path.suffix.lower()
    reader = {".h5": _read_h5, ".hdf5": _read_h5, ".npy": _read_npy, ".pt": _read_pt, ".parquet": _read_parquet}
    if suffix not in reader:
        raise ValueError(f"unknown embedding file format {suffix!r}: {str(path)!r}")
    embeddings = reader[suffix](path)
    for name, array in embeddings.arrays.items():
        if len(array) != len(embeddings.tile_names):
            raise ValueError(f"{str(path)!r}: {name!r} has {len(array)} rows for {len(embeddings.tile_names)} tile names")
    return embeddings


def read_provenance(path: Path, *, tile_names: bool = False) -> Dict[str, Any]:
    """An output's provenance without its rows (HDF5 attributes, the .npy sidecar, Parquet's schema);
    with ``tile_names``, also ``"tile_names"``. .pt files are read whole: torch has no header to read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            provenance = json.loads(f.attrs.get("h0mini_provenance", "{}"))
            if tile_names:
                provenance["tile_names"] = [n.decode() if isinstance(n, bytes) else str(n) for n in f["tile_names"][()]]
        return provenance
    if suffix == ".npy":
        meta = json.loads(sidecar(path).read_text())
        if meta.get("npy_sha256") != _sha256(path):
            raise ValueError(f"{str(sidecar(path))!r} does not describe {str(path)!r} (an interrupted write?)")
        return dict(meta["provenance"], **({"tile_names": meta["tile_names"]} if tile_names else {}))
    if suffix == ".parquet":
        _, pq = _pyarrow()
        meta = pq.read_schema(path).metadata or {}
        provenance = json.loads(meta.get(b"h0mini_provenance", b"{}"))
        if tile_names:
            provenance["tile_names"] = pq.read_table(path, columns=["tile_name"]).column("tile_name").to_pylist()
        return provenance
    embeddings = read_embeddings(path)
    return dict(embeddings.provenance, **({"tile_names": embeddings.tile_names} if tile_names else {}))


def _sha256(path: Path) -> str:
    from .model import file_sha256

    return file_sha256(path)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _metadata(embeddings: Embeddings) -> Dict[str, Any]:
    meta = {
        "tile_names": embeddings.tile_names,
        "coords": embeddings.coords.tolist() if embeddings.coords is not None else None,
        "provenance": embeddings.provenance,
        "skipped": embeddings.skipped,
    }
    if embeddings.coords_attrs:
        meta["coords_attrs"] = embeddings.coords_attrs
    if embeddings.slide_features is not None:
        meta["slide_features"] = embeddings.slide_features.tolist()
    return meta


def _slide_features(meta: Dict[str, Any]) -> Optional[np.ndarray]:
    value = meta.get("slide_features")
    return None if value is None else np.asarray(value, dtype=np.float32)


# -- HDF5 -------------------------------------------------------------------------------------------


def _write_h5(tmp: Path, embeddings: Embeddings) -> None:
    import h5py

    with h5py.File(tmp, "w") as f:
        for name, array in embeddings.arrays.items():
            if isinstance(array, RowBlocks):
                _fill(f.create_dataset(name, shape=array.shape, dtype=array.dtype), array)
            else:
                f.create_dataset(name, data=array)
        f.create_dataset("tile_names", data=np.array(embeddings.tile_names, dtype=object), dtype=h5py.string_dtype())
        if embeddings.coords is not None:
            coords = f.create_dataset("coords", data=embeddings.coords.astype(np.int64))
            for key, value in embeddings.coords_attrs.items():  # native numbers, as TRIDENT writes them
                coords.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        if embeddings.slide_features is not None:
            f.create_dataset(SLIDE_FEATURES, data=embeddings.slide_features)
        for key, value in embeddings.provenance.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else ("" if value is None else str(value))
        f.attrs["h0mini_provenance"] = json.dumps(embeddings.provenance)
        f.attrs["skipped"] = json.dumps(embeddings.skipped)


def _read_h5(path: Path) -> Embeddings:
    import h5py

    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f.keys() if k not in ("tile_names", "coords", SLIDE_FEATURES)}
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["tile_names"][()]]
        coords = f["coords"][()] if "coords" in f else None
        coords_attrs = {k: _attr(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
        slide_features = f[SLIDE_FEATURES][()] if SLIDE_FEATURES in f else None
        provenance = json.loads(f.attrs.get("h0mini_provenance", "{}"))
        skipped = json.loads(f.attrs.get("skipped", "[]"))
    return Embeddings(arrays, names, coords, provenance, skipped, coords_attrs, slide_features)


def _attr(value: Any) -> Any:
    """An HDF5 attribute as Python: numpy scalars to numbers, JSON-encoded dicts back to dicts."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# -- numpy ------------------------------------------------------------------------------------------


def _write_npy(tmp: Path, embeddings: Embeddings) -> None:
    array = embeddings.arrays["features"]
    if isinstance(array, RowBlocks):
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
        _fill(target, array)
        target.flush()
        del target
        return
    with open(tmp, "wb") as f:
        np.save(f, array)


def _read_npy(path: Path) -> Embeddings:
    meta = json.loads(sidecar(path).read_text())
    if meta.get("npy_sha256") != _sha256(path):
        raise ValueError(f"{str(sidecar(path))!r} does not describe {str(path)!r} (an interrupted write?)")
    coords = np.asarray(meta["coords"], dtype=np.int64) if meta.get("coords") is not None else None
    return Embeddings({"features": np.load(path)}, meta["tile_names"], coords, meta["provenance"], meta["skipped"],
                      meta.get("coords_attrs", {}), _slide_features(meta))


# -- torch ------------------------------------------------------------------------------------------


def _write_pt(tmp: Path, embeddings: Embeddings) -> None:
    payload: Dict[str, Any] = {
        name: torch.from_numpy(np.ascontiguousarray(_whole(a))) for name, a in embeddings.arrays.items()
    }
    payload.update(_metadata(embeddings))
    if embeddings.coords is not None:
        payload["coords"] = torch.from_numpy(embeddings.coords.astype(np.int64))
    torch.save(payload, tmp)


def _read_pt(path: Path) -> Embeddings:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta_keys = ("tile_names", "coords", "provenance", "skipped", "coords_attrs", "slide_features")
    arrays = {k: v.numpy() for k, v in payload.items() if k not in meta_keys}
    coords = payload.get("coords")
    return Embeddings(
        arrays,
        list(payload["tile_names"]),
        coords.numpy() if isinstance(coords, torch.Tensor) else None,
        payload["provenance"],
        payload["skipped"],
        payload.get("coords_attrs", {}),
        _slide_features(payload),
    )


# -- parquet ----------------------------------------------------------------------------------------


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise OptionalDependencyError("pyarrow", extra="parquet", feature="Writing .parquet embeddings") from None
    return pyarrow, pyarrow.parquet


def _write_parquet(tmp: Path, embeddings: Embeddings) -> None:
    pa, pq = _pyarrow()
    features = np.ascontiguousarray(_whole(embeddings.arrays["features"]))
    columns = {"tile_name": pa.array(embeddings.tile_names, pa.string())}
    if embeddings.coords is not None:
        columns["x"] = pa.array(embeddings.coords[:, 0])
        columns["y"] = pa.array(embeddings.coords[:, 1])
    flat = pa.array(features.reshape(-1))
    columns["features"] = pa.FixedSizeListArray.from_arrays(flat, features.shape[1])
    table = pa.table(columns)
    meta = {b"h0mini_provenance": json.dumps(embeddings.provenance), b"h0mini_skipped": json.dumps(embeddings.skipped)}
    if embeddings.coords_attrs or embeddings.slide_features is not None:
        extra = _metadata(embeddings)
        meta[b"h0mini_slide"] = json.dumps({k: extra.get(k) for k in ("coords_attrs", "slide_features")})
    pq.write_table(table.replace_schema_metadata(meta), tmp)


def _read_parquet(path: Path) -> Embeddings:
    _, pq = _pyarrow()
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    width = table.schema.field("features").type.list_size
    features = np.asarray(table.column("features").combine_chunks().flatten()).reshape(table.num_rows, width)
    coords = (
        np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], 1).astype(np.int64)
        if "x" in table.column_names
        else None
    )
    slide = json.loads(meta.get(b"h0mini_slide", b"{}"))
    return Embeddings(
        {"features": features},
        table.column("tile_name").to_pylist(),
        coords,
        json.loads(meta.get(b"h0mini_provenance", b"{}")),
        json.loads(meta.get(b"h0mini_skipped", b"[]")),
        slide.get("coords_attrs") or {},
        _slide_features(slide),
    )
