"""One whole slide in, tile embeddings and coordinates out: a thin layer over the tile pipeline.

``tile_slide`` says which tiles; ``TileEmbedder`` embeds them exactly as it embeds tile files
(same preprocessing, batching, workers, precision); ``embed_to_file`` writes them resumably
through the same writers, with the attributes TRIDENT and CLAM readers expect.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..deprecation import parameter_defaults, take_options
from ..embed import ModelLike, SkippedTilesWarning, TileEmbedder, collect
from ..errors import InvalidArgumentError
from ..job import embed_to_file
from ..tiles import TileInput
from ..writers import read_embeddings
from .grid import MIN_TISSUE, TARGET_MPP, tile_slide
from .manifest import slide_fingerprint
from .qc import save_qc_image
from .reader import describe_slide
from .tissue import MaskLike


@dataclass
class SlideEmbeddings:
    """One slide's tile embeddings, in the grid's order (row by row), with their level-0 coordinates."""

    features: Any  # (N, D) array, or a dict of arrays for embedding="all"
    coords: np.ndarray  # (N, 2) int64, level-0 top-left x, y
    attributes: Dict[str, Any]  # patch_size, patch_size_level0, level0_mpp, target_mpp, ..., precision (bf16...)
    tile_names: List[str]
    slide_features: Optional[np.ndarray] = None  # slide_pool="mean": the mean of the tile features
    output: Optional[Path] = None
    skipped: List[Dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.coords)


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
    embedding: str = "cls+mean",
    batch_size: Optional[int] = None,
    device: Union[str, "torch.device"] = "auto",
    precision: str = "auto",
    num_workers: Union[int, str] = "auto",
    input_size: Union[int, str, None] = None,
    compile: bool = False,
    jpeg_decode: str = "cpu",
    on_error: str = "raise",
    progress: Optional[bool] = None,
    save_every: int = 1024,
    progress_label: Optional[str] = None,
    overwrite: bool = False,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    **options: Any,
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
        embedding, batch_size, device, precision, num_workers, input_size, compile, jpeg_decode,
            revision, token, cache_dir: as in ``h0mini.embed_tiles`` (the same names and defaults),
            when ``model`` is not already a ``TileEmbedder`` (which carries its own).
        on_error, progress: as in ``h0mini.embed_tiles``.
        save_every: with ``output_path``, save progress every so many tiles.
        overwrite: with ``output_path``, replace saved work made with other settings (else
            ``SettingsMismatchError`` names what differs).
        **options: only ``output=`` (the previous name of ``embedding``), with a ``DeprecationWarning``;
            any other name is an ``UnknownOptionError`` listing the valid ones.

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
        raise InvalidArgumentError(f"slide_pool must be None or 'mean', got {slide_pool!r}", argument="slide_pool",
                                   accepted="None, 'mean'")
    embedding = take_options("embed_slide", embed_slide, options, {"embedding": embedding})["embedding"]
    settings = dict(embedding=embedding, batch_size=batch_size, device=device, precision=precision,
                    num_workers=num_workers, input_size=input_size, compile=compile, jpeg_decode=jpeg_decode,
                    revision=revision, token=token, cache_dir=cache_dir)
    if isinstance(model, TileEmbedder):
        defaults = parameter_defaults(embed_slide)
        given = sorted(name for name, value in settings.items() if value != defaults[name])
        if given:
            raise InvalidArgumentError(
                f"embed_slide: model is a TileEmbedder, which carries its own settings; {', '.join(given)} "
                "would be ignored. Build the TileEmbedder with them, or pass the model itself"
            )
        embedder = model
    else:
        embedder = TileEmbedder(model, **settings)
    if slide_pool and embedder.output not in ("cls", "mean", "cls+mean"):
        raise InvalidArgumentError(f"slide_pool='mean' needs vector outputs (cls, mean, cls+mean), not {embedder.output!r}",
                                   argument="slide_pool", accepted="None with this embedding")
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
            progress_label=progress_label, overwrite=overwrite,
            slide=slide_fingerprint(os.fspath(slide)) if isinstance(slide, (str, os.PathLike)) else None,
        )
        saved = read_embeddings(Path(output_path))
        features = saved.arrays if embedder.output == "all" else saved.arrays["features"]
        coords = saved.coords if saved.coords is not None else np.zeros((0, 2), np.int64)
        return SlideEmbeddings(features, coords, dict(tiles.attributes(), precision=embedder.precision),
                               saved.tile_names, saved.slide_features,
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
    return SlideEmbeddings(features, tiles.coords[keep], dict(tiles.attributes(), precision=embedder.precision),
                           names, pooled, None,
                           [{"index": s.index, "path": s.source, "reason": s.reason} for s in skipped])


def slide_request(mpp: Optional[float], target_mpp: float, overlap: int, tissue: Any, min_tissue: float,
                  allow_upsampling: bool, slide_pool: Optional[str]) -> Dict[str, Any]:
    """The caller's tiling arguments, as recorded in an output: a rerun that asks the same skips the slide."""
    return {
        "mpp": mpp, "target_mpp": target_mpp, "overlap": overlap,
        "tissue": tissue if tissue is None or tissue == "otsu" else "mask", "min_tissue": min_tissue,
        "allow_upsampling": allow_upsampling, "slide_pool": slide_pool,
    }
