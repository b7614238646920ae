"""Whole slides in, tile embeddings and coordinates out: a thin layer over the tile pipeline.

``tile_slide`` says which tiles; ``TileEmbedder`` embeds them exactly as it embeds tile files
(same preprocessing, batching, workers, precision); ``embed_to_file`` writes them resumably
through the same writers, with the attributes TRIDENT and CLAM readers expect.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..embed import ModelLike, SkippedTilesWarning, TileEmbedder, collect, make_progress
from ..errors import H0miniError, OutputNotWritableError, SlideError, shown
from ..job import embed_to_file, job_settings, _same_numbers
from ..tiles import TileInput
from ..writers import atomic_path, check_writable, read_embeddings
from .grid import MIN_TISSUE, TARGET_MPP, SlideTiles, slide_stem, tile_slide
from .qc import save_qc_image
from .reader import describe_slide
from .shard import Shard, resolve_shard
from .tissue import MaskLike
from .discover import find_slides

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("slide", "status", "tiles", "skipped_tiles", "seconds", "output", "qc", "error")


@dataclass
class SlideEmbeddings:
    """One slide's tile embeddings, in the grid's order (row by row), with their level-0 coordinates."""

    features: Any  # (N, D) array, or a dict of arrays for output="all"
    coords: np.ndarray  # (N, 2) int64, level-0 top-left x, y
    attributes: Dict[str, Any]  # patch_size, patch_size_level0, level0_mpp, target_mpp, ...
    tile_names: List[str]
    slide_features: Optional[np.ndarray] = None  # slide_pool="mean": the mean of the tile features
    output: Optional[Path] = None
    skipped: List[Dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class SlideStatus:
    """One row of ``embed_slides``' summary."""

    slide: str
    status: str  # "done", "already done", "failed"
    tiles: int = 0
    skipped_tiles: int = 0
    seconds: float = 0.0
    output: str = ""
    qc: str = ""
    error: str = ""


def embed_slide(
    slide: Any,
    model: Union[ModelLike, TileEmbedder] = None,
    *,
    output_path: Union[str, os.PathLike, None] = None,
    qc_path: Union[str, os.PathLike, None] = None,
    mpp: Optional[float] = None,
    target_mpp: float = TARGET_MPP,
    overlap: int = 0,
    tissue: Union[str, MaskLike, None] = "otsu",
    min_tissue: float = MIN_TISSUE,
    reader: str = "auto",
    allow_upsampling: bool = False,
    slide_pool: Optional[str] = None,
    output: str = "cls+mean",
    on_error: str = "raise",
    progress: Optional[bool] = None,
    save_every: int = 1024,
    progress_label: Optional[str] = None,
    **embedder_options: Any,
) -> SlideEmbeddings:
    """Embed the tissue tiles of one whole-slide image with H0-mini.

    Args:
        slide: a slide file (anything OpenSlide or tiffslide opens) or an OpenSlide-like object.
        model: a model from ``load_model()``, weights to load, or a ``TileEmbedder`` to reuse.
            Default: H0-mini.
        output_path: also write the result there (``.h5``: TRIDENT/CLAM layout, resumable: a rerun
            after an interruption embeds only the missing tiles).
        qc_path: write a PNG of the thumbnail, the tissue outline and the kept tiles there.
        mpp, target_mpp, overlap, tissue, min_tissue, reader, allow_upsampling: how the slide is
            tiled; see ``h0mini.tile_slide``. Tiles are the model's input size at ``target_mpp``.
        slide_pool: ``"mean"`` adds the mean of the tile features as ``slide_features``.
        output, on_error, progress: as in ``h0mini.embed_tiles``.
        save_every: with ``output_path``, save progress every so many tiles.
        **embedder_options: ``batch_size``, ``device``, ``precision``, ``num_workers``, ``compile``
            (as in ``h0mini.embed_tiles``), when ``model`` is not already a ``TileEmbedder``.

    Returns:
        ``SlideEmbeddings`` with ``features`` (N, D), ``coords`` (N, 2) and ``attributes``.

    Raises:
        SlideError: the slide cannot be opened or read, records no µm/px (pass ``mpp``), or the target
            resolution would need upsampling.

    Example:
        >>> res = h0mini.embed_slide("slide.svs", model)
        >>> res.features.shape, res.coords.shape
        ((59, 1536), (59, 2))
    """
    if slide_pool not in (None, "mean"):
        raise ValueError(f"slide_pool must be None or 'mean', got {slide_pool!r}")
    embedder = model if isinstance(model, TileEmbedder) else TileEmbedder(model, output=output, **embedder_options)
    if slide_pool and embedder.output not in ("cls", "mean", "cls+mean"):
        raise ValueError(f"slide_pool='mean' needs vector outputs (cls, mean, cls+mean), not {embedder.output!r}")
    tiles = tile_slide(
        slide, mpp=mpp, target_mpp=target_mpp, tile_size=embedder.preprocessing.size or 224, overlap=overlap,
        tissue=tissue, min_tissue=min_tissue, reader=reader, allow_upsampling=allow_upsampling,
    )
    if len(tiles) == 0:
        warnings.warn(f"{describe_slide(slide)!r}: no tile has enough tissue (min_tissue={min_tissue}); "
                      "the result is empty. Lower min_tissue or pass tissue=None to keep every tile", stacklevel=2)
    if qc_path is not None:
        save_qc_image(tiles, qc_path)
    if output_path is not None:
        request = slide_request(mpp, target_mpp, overlap, tissue, min_tissue, allow_upsampling, slide_pool)
        embed_to_file(
            tiles.regions(), output_path, embedder, on_error=on_error, part_size=save_every, progress=progress,
            tiling=dict(tiles.settings(), request=request), coords_attrs=tiles.attributes(), slide_pool=slide_pool,
            progress_label=progress_label,
        )
        saved = read_embeddings(Path(output_path))
        features = saved.arrays if embedder.output == "all" else saved.arrays["features"]
        coords = saved.coords if saved.coords is not None else np.zeros((0, 2), np.int64)
        return SlideEmbeddings(features, coords, tiles.attributes(), saved.tile_names, saved.slide_features,
                               Path(output_path), saved.skipped)
    source = TileInput(tiles.regions(), single=False, length=len(tiles), all_paths=not tiles.in_process_only,
                       in_process_only=tiles.in_process_only)
    features, skipped = collect(embedder, source, on_error=on_error, progress=progress)
    if skipped:
        warnings.warn(SkippedTilesWarning(skipped), stacklevel=2)
    bad = {s.index for s in skipped}
    keep = np.array([i for i in range(len(tiles)) if i not in bad], dtype=np.int64)
    names = [tiles[int(i)].name for i in keep]
    pooled = None
    if slide_pool == "mean":
        pooled = features.mean(0) if len(features) else np.full(features.shape[1:], np.nan, np.float32)
    return SlideEmbeddings(features, tiles.coords[keep], tiles.attributes(), names, pooled, None,
                           [{"index": s.index, "path": s.source, "reason": s.reason} for s in skipped])


def slide_request(mpp: Optional[float], target_mpp: float, overlap: int, tissue: Any, min_tissue: float,
                  allow_upsampling: bool, slide_pool: Optional[str]) -> Dict[str, Any]:
    """The caller's tiling arguments, as recorded in an output: a rerun that asks the same skips the slide."""
    return {
        "mpp": mpp, "target_mpp": target_mpp, "overlap": overlap,
        "tissue": tissue if tissue is None or isinstance(tissue, str) else "mask", "min_tissue": min_tissue,
        "allow_upsampling": allow_upsampling, "slide_pool": slide_pool,
    }


def embed_slides(
    slides: Sequence[Union[str, os.PathLike]],
    output_dir: Union[str, os.PathLike],
    model: ModelLike = None,
    *,
    shard: Union[str, Shard, None] = None,
    qc: bool = True,
    progress: Optional[bool] = None,
    mpp: Optional[float] = None,
    target_mpp: float = TARGET_MPP,
    overlap: int = 0,
    tissue: Union[str, None] = "otsu",
    min_tissue: float = MIN_TISSUE,
    reader: str = "auto",
    allow_upsampling: bool = False,
    slide_pool: Optional[str] = None,
    output: str = "cls+mean",
    on_error: str = "raise",
    save_every: int = 1024,
    device: Union[str, torch.device] = "auto",
    **embedder_options: Any,
) -> List[SlideStatus]:
    """Embed many slides, one ``OUTPUT_DIR/<slide>.h5`` each, resumably and shardably.

    A rerun skips finished slides and resumes a half-done one from its saved batches; a slide that
    fails is reported (in the returned list and ``summary.csv``) and the others go on. With
    ``shard`` (``"K/N"``), or under torchrun or a SLURM array, this process takes its share of the
    slides; under torchrun each process uses the GPU of its ``LOCAL_RANK``.

    Args:
        slides: slide files, folders of slides, or globs.
        output_dir: where ``<slide>.h5``, ``qc/<slide>.png`` and ``summary.csv`` go.
        model: a model from ``load_model()`` or weights to load. Default: H0-mini.
        shard: ``"K/N"`` (0-based K) or a ``Shard``; default from RANK/WORLD_SIZE or
            SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else all slides.
        qc: write the QC picture of each slide.
        other arguments: as in ``embed_slide`` and ``embed_tiles``.

    Returns:
        One ``SlideStatus`` per slide of this shard, in order.

    Raises:
        SlideError: no slides found, or two slides would write the same output name.
        OutputNotWritableError: ``output_dir`` cannot be written (checked before the model loads).
    """
    paths = find_slides(slides)
    chosen = shard if isinstance(shard, Shard) else resolve_shard(shard)
    mine = chosen.select(paths)
    _check_unique_names(paths)
    out = Path(output_dir)
    check_writable(out, folder=True)
    if device == "auto" and chosen.local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{chosen.local_rank}"
    embedder = TileEmbedder(model, output=output, device=device, **embedder_options)
    request = dict(mpp=mpp, target_mpp=target_mpp, overlap=overlap, tissue=tissue, min_tissue=min_tissue,
                   allow_upsampling=allow_upsampling, slide_pool=slide_pool)
    settings = job_settings(embedder)
    summary_path = out / (f"summary.{chosen.label}.csv" if chosen.label else "summary.csv")
    statuses: List[SlideStatus] = []
    with make_progress(progress, total=len(mine), unit="slide", desc="slides") as bar:
        for path in mine:
            statuses.append(
                _embed_one(path, out, embedder, settings, request, qc, on_error, save_every, reader, progress)
            )
            _write_summary(summary_path, statuses)
            bar.update(1)
    return statuses


def _embed_one(path: str, out: Path, embedder: TileEmbedder, settings: Dict[str, Any], request: Dict[str, Any],
               qc: bool, on_error: str, save_every: int, reader: str, progress: Optional[bool]) -> SlideStatus:
    stem = slide_stem(path)
    target = out / f"{stem}.h5"
    qc_file = out / "qc" / f"{stem}.png"
    started = time.perf_counter()
    finished = _finished(target, settings, slide_request(**request))
    if finished is not None:
        return SlideStatus(path, "already done", finished, output=str(target), qc=str(qc_file) if qc_file.exists() else "")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no tile has enough tissue.*")
            result = embed_slide(
                path, embedder, output_path=target, qc_path=qc_file if qc else None, reader=reader,
                on_error=on_error, save_every=save_every, progress=progress, progress_label=stem, **request,
            )
    except (H0miniError, OSError, ValueError) as error:
        logger.error("%s: %s", shown(path), " ".join(str(error).split()))
        return SlideStatus(path, "failed", seconds=round(time.perf_counter() - started, 2), error=" ".join(str(error).split()))
    if len(result) == 0:
        logger.warning("%s: no tile has enough tissue; %s holds no rows (attributes only)", shown(path), shown(target))
    return SlideStatus(path, "done", len(result), len(result.skipped), round(time.perf_counter() - started, 2),
                       str(target), str(qc_file) if qc else "")


def _finished(target: Path, settings: Dict[str, Any], request: Dict[str, Any]) -> Optional[int]:
    """Tile count of a complete output made with the same settings and tiling request, or None."""
    if not target.exists():
        return None
    try:
        saved = read_embeddings(target)
    except Exception:
        return None
    recorded = (saved.provenance.get("tiling") or {}).get("request")
    if recorded != json.loads(json.dumps(request)) or not _same_numbers(saved.provenance, dict(settings, tiling=saved.provenance.get("tiling"))):
        return None
    return len(saved)


def _check_unique_names(paths: Sequence[str]) -> None:
    seen: Dict[str, str] = {}
    for path in paths:
        stem = slide_stem(path)
        if stem in seen:
            raise SlideError(f"has the same name as {seen[stem]!r}: both would write {stem}.h5; rename one", slide=path)
        seen[stem] = path


def _write_summary(path: Path, statuses: List[SlideStatus]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for status in statuses:
        writer.writerow({k: getattr(status, k) for k in SUMMARY_FIELDS})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
