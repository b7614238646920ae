"""Robustness self-check on a user's own tiles: a report folder a person reads.

For every perturbation of ``perturb.PERTURBATIONS`` and each of its strengths, every tile gets
a variant (the same stain shift, JPEG quality... for all tiles, as one re-stained or re-scanned
slide). Each model embeds the originals and the variants, and the PLISM metrics compare the
"original slide" with the "variant slide": cosine similarity of each tile to its own variant,
and top-k retrieval of the variant among all originals and variants.

The folder holds ``metrics.csv`` (one row per model, perturbation and strength),
``report.md`` (summary and full table, with the plots), ``plots/<metric>.png`` (metric vs
strength, one panel per perturbation, one line per model) and ``examples/tile_<i>.png`` (a tile
with all its variants).
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import EvaluationInputError, InvalidTileError
from ..tiles import open_image, to_rgb
from .perturb import PERTURBATIONS, Perturbation, get_perturbation
from .common import import_optional, progress_bar
from .plism import TOP_K, metric_names, pair_metrics

EmbedFn = Callable[[List[Image.Image]], Any]
"""``embed_fn(list_of_PIL_RGB_images) -> (N, D)`` array, one row per image, in order."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

METRIC_TITLES = {"cosine_similarity": "cosine similarity to the original"}


@dataclass
class RobustnessReport:
    """What ``robustness_report`` wrote: the table and the files."""

    output_dir: Path
    table: Any  # pandas DataFrame, one row per (model, perturbation, strength)
    files: List[Path] = field(default_factory=list)

    def summary(self) -> Any:
        """Each model's metrics at the strongest setting of each perturbation."""
        table = self.table
        strongest = table.groupby(["model", "perturbation"], sort=False)["strength"].transform("max")
        return table[table["strength"] == strongest].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Tiles


def load_tiles(tiles: Any, *, max_tiles: Optional[int] = None) -> Tuple[List[Image.Image], List[str]]:
    """Read tiles as RGB PIL images with a name each, by the rules ``h0mini.embed_tiles`` uses.

    Images are read as ``h0mini.tiles.to_rgb`` reads them (alpha composited on white, which is
    glass in a slide; 16-bit grey scaled to 8 bits), so that the report sees the pixels the
    model is given elsewhere.

    Args:
        tiles: a folder (its image files, sorted, not recursive), an image file, a glob pattern,
            a PIL image, a uint8 ``(H, W, 3)`` array, or a sequence of any of these.
        max_tiles: keep only the first ``max_tiles`` tiles. Paths are expanded (and checked)
            first, but only the kept files are decoded.

    Returns:
        ``(images, names)``; names are file names, or ``tile_<i>`` for in-memory images.

    Raises:
        InvalidTileError (a ValueError): a path matches nothing, a file is not a readable image, an
            array is not uint8 RGB, or no tiles at all.
    """
    if max_tiles is not None and max_tiles < 1:
        raise EvaluationInputError(f"max_tiles must be >= 1, got {max_tiles}")
    items = [tiles] if isinstance(tiles, (str, os.PathLike, Image.Image, np.ndarray)) else list(tiles)
    expanded: List[Any] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            expanded.extend(_expand(Path(item)))
        elif isinstance(item, (Image.Image, np.ndarray)):
            expanded.append(item)
        else:
            raise InvalidTileError(f"expected a path, PIL image or uint8 array, got {type(item).__name__}", index=len(expanded))
    if max_tiles is not None:
        expanded = expanded[:max_tiles]
    images: List[Image.Image] = []
    names: List[str] = []
    for index, item in enumerate(expanded):
        if isinstance(item, Path):
            try:
                images.append(open_image(str(item)))
            except InvalidTileError as error:
                raise InvalidTileError(error.reason, index=index, source=str(item)) from None
            names.append(item.name)
        elif isinstance(item, Image.Image):
            images.append(to_rgb(item))
            names.append(f"tile_{index}")
        else:
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise InvalidTileError(f"arrays must be uint8 RGB (H, W, 3), got {item.dtype} {item.shape}", index=index)
            images.append(Image.fromarray(item))
            names.append(f"tile_{index}")
    if not images:
        raise InvalidTileError("no tiles given")
    return images, names


def _expand(path: Path) -> List[Path]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InvalidTileError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder", source=str(path))
        return found
    if path.is_file():
        return [path]
    if any(c in str(path) for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if found:
            return found
    raise InvalidTileError("no such file, folder or glob match", source=str(path))


# --------------------------------------------------------------------------------------------
# The report


def _warn_if_retrieval_is_trivial(ks: Sequence[int], n: int) -> None:
    """Top-k among 2n - 1 candidates: with few tiles, a random embedding already scores about k / (2n - 1)."""
    pool = 2 * n - 1
    trivial = [k for k in ks if k / pool >= 0.5]
    if trivial:
        k = max(trivial)
        warnings.warn(
            f"top-{k} retrieval among {pool} candidates ({n} tiles): a random embedding would score about "
            f"{k / pool:.2f}, so values near 1.0 hold by construction and say nothing about robustness; "
            f"use at least {k + 1} tiles for top-{k}, and a few dozen for numbers that mean something",
            UserWarning,
            stacklevel=3,
        )


def _resolve_perturbations(
    perturbations: Union[None, Sequence[str], Mapping[str, Sequence[float]]]
) -> List[Tuple[Perturbation, Tuple[float, ...]]]:
    if perturbations is None:
        return [(p, p.strengths) for p in PERTURBATIONS.values()]
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    chosen = []
    items = perturbations.items() if isinstance(perturbations, Mapping) else [(n, None) for n in perturbations]
    for name, strengths in items:
        p = get_perturbation(name)
        levels = tuple(sorted({0.0, *(float(s) for s in (strengths if strengths is not None else p.strengths))}))
        for s in levels:
            p.params(s)  # validates the range with a message naming the perturbation
        chosen.append((p, levels))
    if not chosen:
        raise EvaluationInputError("perturbations is empty")
    return chosen


def _embed(label: str, embed_fn: EmbedFn, images: List[Image.Image]) -> np.ndarray:
    out = embed_fn(images)
    if hasattr(out, "detach"):
        out = out.detach().cpu().float().numpy()
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != len(images):
        raise EvaluationInputError(
            f"model {label!r}: embed_fn returned shape {out.shape} for {len(images)} images; expected ({len(images)}, D)"
        )
    if not np.isfinite(out).all():
        raise EvaluationInputError(f"model {label!r}: embed_fn returned NaN or inf values")
    return out.astype(np.float32, copy=False)


def robustness_report(
    tiles: Any,
    models: Mapping[str, EmbedFn],
    output_dir: Union[str, os.PathLike],
    *,
    perturbations: Union[None, Sequence[str], Mapping[str, Sequence[float]]] = None,
    seed: int = 0,
    ks: Sequence[int] = TOP_K,
    n_examples: int = 2,
    precision: str = "float32",
    tile_names: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
) -> RobustnessReport:
    """Perturb tiles, embed them with each model, and write a robustness report folder.

    Args:
        tiles: what ``load_tiles`` accepts (folder, files, glob, PIL images, arrays). Use tiles of
            one magnification; at least ``(max(ks) + 1) / 2`` of them, and a few dozen for
            top-k values that mean something.
        models: ``{label: embed_fn}``, where ``embed_fn(list of PIL images) -> (N, D)`` array.
            Several models are compared side by side.
        output_dir: the report folder (created; existing files with the same names are replaced).
        perturbations: names from ``PERTURBATIONS`` (default: all), or ``{name: strengths}``.
            Strength 0 (the identity) is always included.
        seed: fixes the random directions of the perturbations.
        ks: top-k values reported.
        n_examples: how many tiles get an example sheet (0 for none).
        precision: ``"float32"`` (default: an unperturbed tile finds itself, top-k 1) or ``"float16"``
            (plism-benchmark's own arithmetic, which drops one of two identical tiles as "the tile itself").
        tile_names: names of the tiles in the report (default: file names, or ``tile_<i>``).
        progress: a progress bar over embedding calls; default only on a terminal.

    Returns:
        ``RobustnessReport`` with the metrics table and the written files.

    Raises:
        EvaluationInputError (a ValueError): no models, unknown perturbations or strengths out of range, too few tiles for
            ``ks``, or an embed_fn returning the wrong shape or NaN (naming the model).
        OptionalDependencyError: pandas or matplotlib is missing.
    """
    pd = import_optional("pandas", "the robustness report")
    import_optional("matplotlib", "the robustness report")
    if not models:
        raise EvaluationInputError("models is empty: pass {label: embed_fn}")
    images, names = load_tiles(tiles)
    n = len(images)
    if tile_names is not None:
        if len(tile_names) != n:
            raise EvaluationInputError(f"tile_names has {len(tile_names)} entries for {n} tiles")
        names = [str(t) for t in tile_names]
    ks = tuple(int(k) for k in ks)
    if ks and max(ks) > 2 * n - 1:
        raise EvaluationInputError(
            f"top-{max(ks)} accuracy needs at least {(max(ks) + 2) // 2} tiles, got {n}; add tiles or pass ks=(1, 3)"
        )
    _warn_if_retrieval_is_trivial(ks, n)
    chosen = _resolve_perturbations(perturbations)
    out = Path(output_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    total = len(models) * (1 + sum(len([s for s in levels if s > 0]) for _, levels in chosen))
    bar = progress_bar(progress, total=total, unit="set", desc="robustness")
    rows: List[Dict[str, Any]] = []
    try:
        originals = {}
        for label, fn in models.items():
            originals[label] = _embed(label, fn, images)
            bar.update(1)
        for p, levels in chosen:
            for strength in levels:
                setting = p.describe(strength, seed=seed)
                variants = images if strength == 0 else [p(image, strength, seed=seed) for image in images]
                for label, fn in models.items():
                    embedded = originals[label] if strength == 0 else _embed(label, fn, variants)
                    if strength > 0:
                        bar.update(1)
                    metrics = pair_metrics(
                        originals[label], embedded, ks=ks, precision=precision, names=("original", f"{p.name} {setting}")
                    )
                    row = {"model": label, "perturbation": p.name, "strength": strength, "setting": setting}
                    rows.append({**row, **metrics, "n_tiles": n})
    finally:
        bar.close()
    table = pd.DataFrame(rows)
    report = RobustnessReport(out, table)
    csv_path = out / "metrics.csv"
    table.to_csv(csv_path, index=False, float_format="%.6f")
    report.files.append(csv_path)
    for metric in metric_names(ks):
        report.files.append(plot_metric(table, metric, out / "plots" / f"{metric}.png"))
    if n_examples > 0:
        (out / "examples").mkdir(exist_ok=True)
        for i in range(min(n_examples, n)):
            report.files.append(plot_examples(images[i], names[i], chosen, out / "examples" / f"tile_{i}.png", seed=seed))
    md_path = out / "report.md"
    md_path.write_text(_markdown(report, names, chosen, seed, ks), encoding="utf-8")
    report.files.append(md_path)
    return report


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no display needed)


def plot_metric(table: Any, metric: str, path: Union[str, os.PathLike]) -> Path:
    """Metric vs strength, one panel per perturbation, one line per model; saved as PNG.

    Returns:
        ``path`` as a ``Path``.
    """
    import_optional("matplotlib", "report plots")
    from matplotlib.figure import Figure

    perturbations = list(dict.fromkeys(table["perturbation"]))
    models = list(dict.fromkeys(table["model"]))
    ncols = min(4, len(perturbations))
    nrows = -(-len(perturbations) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    low = float(table[metric].min())
    bottom = 0.0 if metric != "cosine_similarity" else max(-1.0, low - 0.05 * max(1e-3, 1.0 - low))
    for ax, name in zip(axes.flat, perturbations):
        part = table[table["perturbation"] == name]
        for label in models:
            rows = part[part["model"] == label].sort_values("strength")
            ax.plot(rows["strength"], rows[metric], marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("strength")
        ax.set_ylim(bottom, 1.0 + 0.02 * (1.0 - bottom))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(perturbations) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric.replace("_", " "))
    fig.suptitle(METRIC_TITLES.get(metric, metric.replace("_", " ") + " (variant among originals + variants)"))
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(models)))
    path = Path(path)
    fig.savefig(path)
    return path


def plot_examples(
    image: Image.Image,
    name: str,
    chosen: Sequence[Tuple[Perturbation, Sequence[float]]],
    path: Union[str, os.PathLike],
    *,
    seed: int = 0,
) -> Path:
    """One tile and its variants: a row per perturbation, a column per strength; saved as PNG."""
    import_optional("matplotlib", "report plots")
    from matplotlib.figure import Figure

    ncols = max(len(levels) for _, levels in chosen)
    nrows = len(chosen)
    fig = Figure(figsize=(2.0 * ncols, 2.2 * nrows + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for row, (p, levels) in enumerate(chosen):
        for col in range(ncols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(levels):
                ax.set_visible(False)
                continue
            ax.imshow(np.asarray(p(image, levels[col], seed=seed)))
            ax.set_title(p.describe(levels[col], seed=seed), fontsize=7)
            if col == 0:
                ax.set_ylabel(p.name, fontsize=10)
    fig.suptitle(f"{name}: variants by perturbation (left: original)")
    path = Path(path)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# Markdown


def _md_table(frame: Any, digits: int = 3) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    from pandas.api.types import is_numeric_dtype

    rule = "|" + "|".join(" ---: " if is_numeric_dtype(frame[c]) else " --- " for c in frame.columns) + "|"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _markdown(
    report: RobustnessReport,
    names: List[str],
    chosen: Sequence[Tuple[Perturbation, Sequence[float]]],
    seed: int,
    ks: Sequence[int],
) -> str:
    table = report.table
    metrics = metric_names(ks)
    models = list(dict.fromkeys(table["model"]))
    summary = report.summary()
    lines = [
        "# Robustness self-check",
        "",
        f"{len(names)} tiles, {len(models)} model(s): {', '.join(f'`{m}`' for m in models)}; seed {seed}.",
        "",
        "Each tile is perturbed the same way as if the whole slide had been re-stained or re-scanned, and",
        "embedded again. **cosine similarity**: mean cosine between a tile's embedding and its variant's",
        "(1 = unchanged). **top-k accuracy** (PLISM): how often a tile's variant is among its k nearest",
        f"neighbours of all {2 * len(names) - 1} other originals and variants, both directions averaged",
        "(1 = every tile still finds itself). Strength 0 is the unperturbed tile.",
        "",
        "## Perturbations",
        "",
    ]
    for p, levels in chosen:
        settings = ", ".join(p.describe(s, seed=seed) for s in levels if s > 0)
        lines.append(f"- **{p.name}**: {p.description}. Settings: {settings}.")
    lines += ["", "## Summary (strongest setting of each perturbation)", ""]
    lines.append(_md_table(summary[["model", "perturbation", "setting", *metrics]]))
    lines += ["", "## Plots", ""]
    for metric in metrics:
        lines.append(f"![{metric}](plots/{metric}.png)")
        lines.append("")
    examples = sorted(p for p in report.files if p.parent.name == "examples")
    if examples:
        lines += ["## Example tiles", ""]
        for p in examples:
            lines.append(f"![{p.stem}](examples/{p.name})")
            lines.append("")
    lines += ["## All results", "", _md_table(table[["model", "perturbation", "strength", "setting", *metrics]]), ""]
    return "\n".join(lines)


__all__ = ["EmbedFn", "RobustnessReport", "load_tiles", "plot_examples", "plot_metric", "robustness_report"]
