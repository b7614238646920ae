"""Pictures of what H0-mini sees: patch-feature maps, tile grids, embedding maps (extra ``[viz]``).

The core, :func:`patch_feature_rgb`, is pure numpy. It draws the classic DINOv2-style
picture: a PCA of the patch tokens mapped to RGB, with the background masked.

1. **Background.** A first PCA over the patch tokens of *all* the tiles given; its first
   component is scaled to [0, 1] over those tiles, and patches below ``threshold`` are
   background. The sign of a principal component is arbitrary, so it is oriented: when the
   tiles' pixels are given, so that the component *decreases* with patch brightness (white
   glass ends up low); without pixels, so that its longer tail is low (the background is
   assumed to be the minority). Alternatively ``background="pixels"`` masks the patches whose
   pixels are mostly white glass (:func:`pixel_background_mask`), whatever the model says,
   and ``background=None`` masks nothing.
2. **Colours.** A second PCA over the foreground patches of all the tiles; its first three
   components, clipped to their 1st-99th percentiles and scaled to [0, 1], are red, green and
   blue. Fitting jointly means one colour means one direction of feature space in every tile,
   so tissue structures can be compared across tiles.

The default ``threshold=0.35`` is the value that best matched the white glass of the example tiles
(``examples/tiles``, checked against :func:`pixel_background_mask`) with the tiny random test model,
the only weights available where this package is tested; with trained H0-mini weights the first
component is expected to separate glass more cleanly, but tune ``threshold`` for your model.
Masking assumes that the tiles together hold some background. For tissue-only tiles the
first component separates tissue types instead, and thresholding it hides real tissue: use
``background="pixels"`` or ``None`` there.

matplotlib is imported only by the functions that draw figures (:func:`plot_patch_features`,
:func:`tile_grid`, :func:`plot_embedding_map`, :func:`save_png` of a figure).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .errors import OptionalDependencyError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

TileLike = Union[str, os.PathLike, Image.Image, np.ndarray, Any]
Grid = Union[int, Tuple[int, int], None]

BACKGROUND_RULES = ("pca", "pixels", None)
# A pixel is white glass when it is bright and unsaturated (saturation = max - min channel).
GLASS_BRIGHTNESS = 210
GLASS_SATURATION = 25


@dataclass(frozen=True)
class PatchFeatureMap:
    """Result of :func:`patch_feature_rgb`; unpacks as ``rgb, background``.

    Attributes:
        rgb: float32 ``(N, gh, gw, 3)`` in [0, 1] (``(gh, gw, 3)`` for one tile); background
            patches are black (0, 0, 0).
        background: bool ``(N, gh, gw)`` (``(gh, gw)`` for one tile), True where masked.
        first_component: float32, same shape as ``background``: the oriented first principal
            component scaled to [0, 1] over all tiles (the value compared with ``threshold``).
        explained_variance: float64 ``(3,)``, share of the foreground variance in R, G and B.
    """

    rgb: np.ndarray
    background: np.ndarray
    first_component: np.ndarray
    explained_variance: np.ndarray

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.rgb, self.background))


def patch_feature_rgb(
    patch_tokens: Any,
    grid: Grid = None,
    threshold: Optional[float] = 0.35,
    *,
    tiles: Optional[Sequence[TileLike]] = None,
    background: Optional[str] = "pca",
    tile_size: Optional[int] = 224,
) -> PatchFeatureMap:
    """PCA of patch tokens as RGB images, fitted jointly over tiles, with the background masked.

    Args:
        patch_tokens: ``(P, D)`` for one tile or ``(N, P, D)`` (or a list of ``(P, D)``) for several,
            as ``embed_tiles(..., embedding="patch_tokens")`` returns them (numpy or torch).
        grid: patch grid ``(rows, cols)`` or its side; default: a square grid (16 x 16 for 224 px).
        threshold: with ``background="pca"``, patches whose oriented first component (scaled to
            [0, 1] over all tiles) is below it are background. ``None`` masks nothing.
        tiles: the tiles' pixels (paths, PIL images or uint8 arrays), one per tile. Used to orient the
            first component by brightness, and required by ``background="pixels"``.
        background: ``"pca"`` (default), ``"pixels"`` (:func:`pixel_background_mask`) or ``None``.
        tile_size: tiles are resized and centre-cropped to this size, as the model saw them, before
            their pixels are measured; ``None`` uses them as they are.

    Returns:
        A :class:`PatchFeatureMap`; ``rgb, mask = patch_feature_rgb(...)`` unpacks the image and mask.

    Raises:
        ValueError: inconsistent shapes, an unknown rule, or fewer than 3 foreground patches.

    Example:
        >>> tokens = h0mini.embed_tiles(paths, model, embedding="patch_tokens")  # (7, 256, 768)
        >>> rgb, mask = patch_feature_rgb(tokens, tiles=paths)
        >>> rgb.shape, mask.shape
        ((7, 16, 16, 3), (7, 16, 16))
    """
    if background not in BACKGROUND_RULES:
        raise ValueError(f"background must be one of {BACKGROUND_RULES}, got {background!r}")
    tokens, single = _tokens_array(patch_tokens)
    n_tiles, n_patches, dim = tokens.shape
    rows, cols = _grid(grid, n_patches)
    pixels = None
    if tiles is not None:
        if len(tiles) != n_tiles:
            raise ValueError(f"got {len(tiles)} tiles for {n_tiles} sets of patch tokens")
        pixels = [load_tile(t, tile_size) for t in tiles]
    flat = tokens.reshape(-1, dim)

    first = _first_component(flat, pixels, (rows, cols))
    if background == "pca":
        mask = first < threshold if threshold is not None else np.zeros(len(flat), bool)
    elif background == "pixels":
        if pixels is None:
            raise ValueError("background='pixels' needs the tiles' pixels: pass tiles=")
        mask = np.concatenate([pixel_background_mask(p, (rows, cols)).ravel() for p in pixels])
    else:
        mask = np.zeros(len(flat), bool)

    foreground = flat[~mask]
    if len(foreground) < 3:
        raise ValueError(
            f"only {len(foreground)} of {len(flat)} patches are foreground; lower threshold (now {threshold}) "
            "or use background=None"
        )
    components, variance = _pca(foreground, 3)
    scores = (flat - foreground.mean(0)) @ components
    low, high = np.percentile(scores[~mask], [1.0, 99.0], axis=0)
    rgb = np.clip((scores - low) / np.maximum(high - low, 1e-12), 0.0, 1.0).astype(np.float32)
    rgb[mask] = 0.0
    if components.shape[1] < 3:  # fewer than 3 feature dimensions: missing channels stay black
        rgb = np.concatenate([rgb, np.zeros((len(rgb), 3 - rgb.shape[1]), np.float32)], axis=1)
        variance = np.concatenate([variance, np.zeros(3 - len(variance))])

    shape = (n_tiles, rows, cols)
    result = PatchFeatureMap(
        rgb=rgb.reshape(*shape, 3),
        background=mask.reshape(shape),
        first_component=first.astype(np.float32).reshape(shape),
        explained_variance=variance,
    )
    if single:
        return PatchFeatureMap(result.rgb[0], result.background[0], result.first_component[0], variance)
    return result


def pixel_background_mask(
    tile: TileLike,
    grid: Grid = 16,
    *,
    brightness: int = GLASS_BRIGHTNESS,
    saturation: int = GLASS_SATURATION,
    min_fraction: float = 0.5,
) -> np.ndarray:
    """Patches that are mostly white glass, from the pixels alone: bool ``(rows, cols)``.

    A pixel is glass when its mean channel value is at least ``brightness`` and its saturation
    (max - min channel) at most ``saturation``; a patch is background when at least
    ``min_fraction`` of its pixels are glass. The tile is cut into ``grid`` cells as evenly as its
    size allows (exactly the 14 px patches for a 224 px tile and a 16 x 16 grid).
    """
    pixels = load_tile(tile).astype(np.int16)
    glass = (pixels.mean(-1) >= brightness) & ((pixels.max(-1) - pixels.min(-1)) <= saturation)
    return _cell_means(glass.astype(np.float32), _grid(grid, None)) >= min_fraction


def patch_brightness(tile: TileLike, grid: Grid = 16) -> np.ndarray:
    """Mean pixel value (0-255) of each patch cell: float ``(rows, cols)``."""
    return _cell_means(load_tile(tile).astype(np.float32).mean(-1), _grid(grid, None))


def load_tile(tile: TileLike, size: Optional[int] = None) -> np.ndarray:
    """A tile as uint8 RGB ``(H, W, 3)``; with ``size``, resized (bicubic, shorter side) and centre-cropped."""
    if isinstance(tile, (str, os.PathLike)):
        from .tiles import open_image

        image = open_image(str(tile))
    elif isinstance(tile, Image.Image):
        from .tiles import to_rgb

        image = to_rgb(tile)
    else:
        array = np.asarray(tile.detach().cpu() if hasattr(tile, "detach") else tile)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:  # (3, H, W) tensor layout
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"a tile must be (H, W, 3) RGB, got shape {array.shape}")
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.round(array * 255.0), 0, 255)
        image = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)), "RGB")
    if size is not None and image.size != (size, size):
        from .tiles import centre_crop_resized, check_aspect

        check_aspect(*image.size)
        image = centre_crop_resized(image, size, size, Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def upsample(rgb: np.ndarray, size: int) -> np.ndarray:
    """A ``(gh, gw, 3)`` float map in [0, 1] as a uint8 ``(size, size, 3)`` image, nearest-neighbour."""
    rows = np.minimum((np.arange(size) * rgb.shape[0]) // size, rgb.shape[0] - 1)
    cols = np.minimum((np.arange(size) * rgb.shape[1]) // size, rgb.shape[1] - 1)
    return np.round(np.clip(rgb[rows][:, cols], 0.0, 1.0) * 255.0).astype(np.uint8)


def side_by_side(tile: TileLike, rgb: np.ndarray, *, tile_size: int = 224, gap: int = 4) -> np.ndarray:
    """Tile and its patch-feature map next to each other, as one uint8 image (no matplotlib needed)."""
    pixels = load_tile(tile, tile_size)
    spacer = np.full((pixels.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([pixels, spacer, upsample(rgb, pixels.shape[0])], axis=1)


def embedding_2d(embeddings: Any, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    """Project ``(N, D)`` embeddings to ``(N, 2)`` with PCA, or UMAP (package ``umap-learn``)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"embeddings must be (N, D) with N >= 2, got shape {x.shape}")
    if method == "pca":
        components, _ = _pca(x, 2)
        out = (x - x.mean(0)) @ components
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))).astype(np.float32)
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise OptionalDependencyError("umap-learn", extra="umap", feature="method='umap'") from error
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(15, len(x) - 1)),
            init="spectral" if len(x) > 20 else "random",
            random_state=seed,
            n_jobs=1,  # a seeded UMAP runs single-threaded anyway; saying so avoids its warning
        )
        return reducer.fit_transform(x).astype(np.float32)
    raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")


# -- figures (matplotlib) ------------------------------------------------------------------------


def plot_patch_features(
    tiles: Sequence[TileLike],
    patch_tokens: Any,
    *,
    threshold: Optional[float] = 0.35,
    background: Optional[str] = "pca",
    titles: Optional[Sequence[str]] = None,
    ncols: int = 4,
    tile_size: Optional[int] = 224,
    panel_size: float = 2.2,
) -> "Figure":
    """Each tile next to its patch-feature map (PCA fitted jointly, background black).

    Args:
        tiles: the tiles (paths, PIL images or uint8 arrays), in the order of ``patch_tokens``.
        patch_tokens: ``(N, P, D)`` from ``embed_tiles(tiles, model, embedding="patch_tokens")``.
        threshold, background, tile_size: as in :func:`patch_feature_rgb`.
        titles: one per tile; default: file names for paths, else ``tile 0``, ``tile 1``...
        ncols: tile/map pairs per row.
        panel_size: inches per picture.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot; save it with :func:`save_png`).
    """
    tiles = list(tiles)
    maps = patch_feature_rgb(patch_tokens, threshold=threshold, tiles=tiles, background=background, tile_size=tile_size)
    rgb = maps.rgb[None] if maps.rgb.ndim == 3 else maps.rgb
    titles = _titles(tiles, titles)
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    figure = _figure(figsize=(2 * ncols * panel_size, nrows * (panel_size + 0.3) + 0.3))
    axes = figure.subplots(nrows, 2 * ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, tile in enumerate(tiles):
        row, col = divmod(i, ncols)
        pixels = load_tile(tile, tile_size)
        axes[row, 2 * col].imshow(pixels)
        axes[row, 2 * col].set_title(titles[i], fontsize=8)
        axes[row, 2 * col + 1].imshow(upsample(rgb[i], pixels.shape[0]))
        masked = float(maps.background.reshape(len(tiles), -1)[i].mean())
        axes[row, 2 * col + 1].set_title(f"features ({masked:.0%} masked)", fontsize=8)
    rule = {"pca": f"first component < {threshold}", "pixels": "white glass in the pixels", None: "none"}[background]
    fitted = f"fitted over all {len(tiles)} tiles" if len(tiles) > 1 else "of one tile"
    figure.suptitle(f"PCA of patch tokens, {fitted}; background (black): {rule}", fontsize=9)
    return figure


def tile_grid(
    tiles: Sequence[TileLike],
    *,
    titles: Optional[Sequence[str]] = None,
    ncols: int = 4,
    tile_size: Optional[int] = None,
    panel_size: float = 2.2,
) -> "Figure":
    """The tiles in a grid with their titles (default: file names). Returns a matplotlib Figure."""
    tiles = list(tiles)
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    titles = _titles(tiles, titles)
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    figure = _figure(figsize=(ncols * panel_size, nrows * (panel_size + 0.3)))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, tile in enumerate(tiles):
        ax = axes[divmod(i, ncols)]
        ax.imshow(load_tile(tile, tile_size))
        ax.set_title(titles[i], fontsize=8)
    return figure


def plot_embedding_map(
    embeddings: Any,
    labels: Optional[Sequence[Any]] = None,
    *,
    method: str = "pca",
    seed: int = 0,
    title: Optional[str] = None,
    point_size: float = 12.0,
) -> "Figure":
    """2-D map of ``(N, D)`` embeddings (:func:`embedding_2d`), one colour per label, with a legend."""
    xy = embedding_2d(embeddings, method, seed=seed)
    labels = list(labels) if labels is not None else [None] * len(xy)
    if len(labels) != len(xy):
        raise ValueError(f"got {len(labels)} labels for {len(xy)} embeddings")
    figure = _figure(figsize=(6.0, 4.5))
    ax = figure.subplots()
    names = list(dict.fromkeys(labels))
    colours = _colours(len(names))
    for colour, name in zip(colours, names):
        keep = np.array([label == name for label in labels])
        ax.scatter(xy[keep, 0], xy[keep, 1], s=point_size, color=colour, label=None if name is None else str(name),
                   alpha=0.8, linewidths=0)
    if any(name is not None for name in names):
        ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title or f"{method.upper()} of {len(xy)} embeddings", fontsize=9)
    return figure


def save_png(image: Any, path: Union[str, os.PathLike], *, dpi: int = 120) -> Path:
    """Save a matplotlib Figure, or an image array (uint8, or float in [0, 1]), as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(image, "savefig"):
        image.savefig(path, format="png", dpi=dpi, facecolor="white")
        return path
    array = np.asarray(image)
    if np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image to save must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(path, format="PNG")
    return path


# -- internals ------------------------------------------------------------------------------------


def _tokens_array(patch_tokens: Any) -> Tuple[np.ndarray, bool]:
    if isinstance(patch_tokens, (list, tuple)):
        patch_tokens = np.stack([_to_numpy(t) for t in patch_tokens])
    tokens = _to_numpy(patch_tokens)
    if tokens.ndim not in (2, 3):
        raise ValueError(f"patch_tokens must be (P, D) or (N, P, D), got shape {tokens.shape}")
    if not np.isfinite(tokens).all():
        raise ValueError("patch_tokens contain NaN or infinite values")
    return (tokens[None], True) if tokens.ndim == 2 else (tokens, False)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float64)


def _grid(grid: Grid, n_patches: Optional[int]) -> Tuple[int, int]:
    if grid is None:
        if n_patches is None:
            raise ValueError("grid is required")
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(
                f"{n_patches} patch tokens do not form a square grid; pass grid=(rows, cols). (With all "
                "tokens, drop the CLS and register tokens first: embed_tiles(..., embedding='patch_tokens').)"
            )
        return side, side
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows <= 0 or cols <= 0 or (n_patches is not None and rows * cols != n_patches):
        raise ValueError(f"grid {rows}x{cols} does not fit {n_patches} patch tokens")
    return rows, cols


def _cell_means(values: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    if values.shape[0] < rows or values.shape[1] < cols:
        raise ValueError(f"a {values.shape[1]}x{values.shape[0]} px tile cannot be cut into {rows}x{cols} patches")
    return np.array([[c.mean() for c in np.array_split(r, cols, axis=1)] for r in np.array_split(values, rows, axis=0)])


def _pca(x: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k principal axes (D, k), each signed so its scores have positive skew, and variance ratios."""
    centred = x - x.mean(0)
    if centred.shape[0] > centred.shape[1]:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        values, vectors = values[::-1], vectors[:, ::-1]
    else:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        values, vectors = singular**2, vt.T
    k = min(k, vectors.shape[1])
    vectors = vectors[:, :k].copy()
    scores = centred @ vectors
    vectors *= np.where(np.sum(scores**3, axis=0) < 0, -1.0, 1.0)
    total = float(np.clip(values, 0, None).sum()) or 1.0
    return vectors, np.clip(values[:k], 0, None) / total


def _first_component(flat: np.ndarray, pixels: Optional[List[np.ndarray]], grid: Tuple[int, int]) -> np.ndarray:
    """First principal component over all patches, oriented (background low) and scaled to [0, 1]."""
    axis, _ = _pca(flat, 1)
    score = (flat - flat.mean(0)) @ axis[:, 0]
    if pixels is not None:
        brightness = np.concatenate([_cell_means(p.astype(np.float32).mean(-1), grid).ravel() for p in pixels])
        flip = np.std(brightness) > 0 and np.corrcoef(score, brightness)[0, 1] > 0
    else:
        flip = np.median(score) < np.mean(score)  # the longer tail (the minority) goes low
    if flip:
        score = -score
    low, high = score.min(), score.max()
    return (score - low) / (high - low) if high > low else np.ones_like(score)


def _titles(tiles: Sequence[TileLike], titles: Optional[Sequence[str]]) -> List[str]:
    if titles is not None:
        if len(titles) != len(tiles):
            raise ValueError(f"got {len(titles)} titles for {len(tiles)} tiles")
        return [str(t) for t in titles]
    return [Path(t).stem if isinstance(t, (str, os.PathLike)) else f"tile {i}" for i, t in enumerate(tiles)]


def _matplotlib(feature: str) -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise OptionalDependencyError("matplotlib", extra="viz", feature=feature) from error
    return matplotlib


def _figure(figsize: Tuple[float, float]) -> "Figure":
    _matplotlib("h0mini.viz figures")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _colours(n: int) -> List[Any]:
    _matplotlib("h0mini.viz figures")
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


__all__ = [
    "PatchFeatureMap",
    "patch_feature_rgb",
    "pixel_background_mask",
    "patch_brightness",
    "load_tile",
    "upsample",
    "side_by_side",
    "embedding_2d",
    "plot_patch_features",
    "tile_grid",
    "plot_embedding_map",
    "save_png",
]
