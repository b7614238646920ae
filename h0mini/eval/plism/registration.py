"""Slides of one run: read on demand, checked to hold the same tiles in the same order, prepared once.

A slide's rows must be the same tissue as every other slide's rows: identical coordinates when
slides carry them, else identical tile file names (``h0mini embed`` records them; folders and
the slide's own name in the file name are ignored).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ...errors import EvaluationInputError
from . import float16, float32
from .files import SlideFeatures, as_names, basename, output_warning, read_slide_file
from .inputs import as_matrix, check_same_shape

Prepared = Union[float16.HalfFeatures, float32.UnitFeatures]


def _tile_key(tile_name: str, slide: str) -> str:
    """What must agree between slides: the file name, without the slide's own name in it.

    Tiles of different slides live in different folders (``GM_P/tile_3.png``) or carry the slide
    name (``GM_P_x224_y0.png``); the rest of the name identifies the tissue.
    """
    base = basename(tile_name)
    return base.replace(slide, "") if slide else base


class SlideStore:
    """Normalised features of each slide on the device, loaded on demand, at most ``capacity`` kept."""

    def __init__(
        self,
        sources: Mapping[str, Any],
        *,
        precision: str,
        device: torch.device,
        kmax: int,
        chunk_size: int,
        tile_indices: Optional[np.ndarray],
        coords_columns: Optional[int],
        check_coords: bool,
        capacity: Optional[int],
    ):
        self.sources = sources
        self.precision = precision
        self.device = device
        self.kmax = kmax
        self.chunk_size = chunk_size
        self.tile_indices = tile_indices
        self.coords_columns = coords_columns
        self.check_coords = check_coords
        self.capacity = capacity
        self.cache: "OrderedDict[str, Prepared]" = OrderedDict()
        self.reference: Optional[Tuple[str, Tuple[int, int]]] = None
        self.reference_coords: Optional[Tuple[str, np.ndarray]] = None  # first slide with coordinates
        self.reference_names: Optional[Tuple[str, List[str], List[str]]] = None  # first with tile names: keys, names
        self.warned: set = set()  # one warning per kind and slide, and one per run for the output mode

    def _read(self, name: str) -> SlideFeatures:
        source = self.sources[name]
        if isinstance(source, SlideFeatures):
            return source
        if isinstance(source, (str, Path)):
            return read_slide_file(source, self.coords_columns)
        if isinstance(source, Mapping):
            if "features" not in source:
                raise EvaluationInputError(f"slide {name!r}: a mapping value needs a 'features' entry (keys: {sorted(source)})")
            coords, names = source.get("coords"), source.get("tile_names")
            features = as_matrix(source["features"], name)
            return SlideFeatures(
                features, None if coords is None else np.asarray(coords), tile_names=None if names is None else as_names(names)
            )
        array = as_matrix(source, name)
        if self.coords_columns:
            return SlideFeatures(array[:, self.coords_columns:], array[:, : self.coords_columns])
        return SlideFeatures(array)

    def _warn_once(self, key: Any, message: str, stacklevel: int) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)

    def tile_count(self, name: str) -> int:
        """How many tiles the slide holds (before any subset)."""
        return as_matrix(self._read(name).features, name).shape[0]

    def get(self, name: str) -> Prepared:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        slide = self._read(name)
        message = output_warning(slide, name)
        if message:
            self._warn_once("output", message + " (warned once per run)", stacklevel=3)  # evaluate_slides' caller
        features, coords, names = as_matrix(slide.features, name), slide.coords, slide.tile_names
        for field_name, rows in (("coords", coords), ("tile_names", names)):
            if rows is not None and len(rows) != features.shape[0]:
                raise EvaluationInputError(
                    f"slide {name!r}: field {field_name!r} has {len(rows)} rows but 'features' has {features.shape[0]}"
                )
        if coords is not None:
            coords = np.asarray(coords)
        if self.tile_indices is not None:
            if len(features) <= int(self.tile_indices.max()):
                raise EvaluationInputError(
                    f"slide {name!r} has {len(features)} tiles; tile_indices asks for tile {int(self.tile_indices.max())}"
                )
            features = features[self.tile_indices]
            coords = None if coords is None else coords[self.tile_indices]
            names = None if names is None else [names[i] for i in self.tile_indices]
        self._check_registration(name, features.shape, coords, names, slide)
        if self.precision == "float16":
            prepared: Prepared = float16.prepare_half(features, name=name, device=self.device)
            float16.within_slide_top(prepared, self.kmax, self.chunk_size)
        else:
            prepared = float32.prepare_features(features, name=name, device=self.device)
            float32.within_slide_top(prepared, self.kmax, self.chunk_size)
        self.cache[name] = prepared
        if self.capacity is not None:
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return prepared

    def _check_registration(
        self,
        name: str,
        shape: Tuple[int, int],
        coords: Optional[np.ndarray],
        names: Optional[List[str]],
        slide: SlideFeatures,
    ) -> None:
        if self.reference is None:
            self.reference = (name, tuple(shape))
        else:
            check_same_shape(self.reference[1], shape, (self.reference[0], name))
        if slide.skipped and (not self.check_coords or (coords is None and names is None)):
            why = "check_coords=False is set" if not self.check_coords else "it has no tile names or coordinates"
            self._warn_once(
                ("skipped", name),
                f"slide {name!r} ({slide.source or 'in memory'}): {slide.skipped} tile(s) skipped when it was "
                f"embedded (h0mini embed --on-error skip), and {why}, so nothing checks that its rows are the same "
                f"tiles as the other slides'; the metrics are wrong if they are not. Re-embed the skipped tiles, or "
                f"drop them from every slide",
                stacklevel=4,
            )
        if not self.check_coords:
            return
        compared = False
        if coords is not None:
            if self.reference_coords is None:  # coordinates are compared with the first slide that has them
                self.reference_coords = (name, coords)
            else:
                self._compare_coords(name, coords)
                compared = True
        if names is not None:
            keys = [_tile_key(n, name) for n in names]
            if self.reference_names is None:
                self.reference_names = (name, keys, names)
            elif not compared:  # equal coordinates already prove the rows match, whatever the file names
                self._compare_names(name, keys, names)

    def _compare_coords(self, name: str, coords: np.ndarray) -> None:
        ref_name, ref_coords = self.reference_coords  # type: ignore[misc]
        if coords.shape != ref_coords.shape:
            raise EvaluationInputError(
                f"slide {name!r}: field 'coords' has shape {coords.shape}, slide {ref_name!r} {ref_coords.shape}"
            )
        if not np.array_equal(coords, ref_coords):
            row = int(np.argwhere((coords != ref_coords).reshape(len(coords), -1).any(axis=1))[0][0])
            raise EvaluationInputError(
                f"slide {name!r}: field 'coords' differs from slide {ref_name!r} at tile {row} "
                f"({coords[row].tolist()} vs {ref_coords[row].tolist()}): the tiles are not registered "
                f"(same tissue, same order) across slides; pass check_coords=False to compare anyway"
            )

    def _compare_names(self, name: str, keys: List[str], names: List[str]) -> None:
        ref_name, ref_keys, ref_names = self.reference_names  # type: ignore[misc]
        row = next((i for i, (a, b) in enumerate(zip(keys, ref_keys)) if a != b), None)
        if row is None:
            return
        raise EvaluationInputError(
            f"slide {name!r}: field 'tile_names' differs from slide {ref_name!r} at tile {row} "
            f"({basename(names[row])!r} vs {basename(ref_names[row])!r}): the tiles are not registered (same tissue, "
            f"same order) across slides, e.g. a tile skipped by `h0mini embed --on-error skip` in one slide only; "
            f"embed the same tiles for every slide, or pass check_coords=False to compare anyway"
        )


__all__ = ["Prepared", "SlideStore"]
