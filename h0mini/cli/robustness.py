"""``h0mini robustness``: stain/scanner robustness self-check of one or more models on your tiles."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import EvaluationInputError, shown
from . import batch_size_help, check_device, result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "robustness",
        help="stain/scanner robustness self-check on your tiles (report folder: CSV, Markdown, PNG)",
        description=(
            "Perturb each tile as a re-stained or re-scanned slide would look (H&E stain strength, "
            "brightness, contrast, gamma, JPEG, blur, coarser resolution), embed originals and variants "
            "(CLS token), and report the PLISM metrics (cosine similarity, top-k retrieval) per "
            "perturbation and strength. Repeat --weights to compare models side by side. Needs the "
            "extra h0mini[eval]. TILES: image files, folders (their image files) or globs."
        ),
        epilog=(
            "example: h0mini robustness examples/tiles -o robustness/ "
            "--weights bioptimus/H0-mini --weights ./my-distilled-model"
        ),
    )
    parser.add_argument("tiles", nargs="+", metavar="TILES", help="tile files, folders or globs")
    parser.add_argument("-o", "--output", required=True, metavar="REPORT", help="report folder (created)")
    parser.add_argument(
        "--weights",
        action="append",
        default=None,
        help="Hub repo id, local folder or weights file; repeat to compare models (default: bioptimus/H0-mini)",
    )
    parser.add_argument("--label", action="append", default=None, help="a name per --weights for the report (default: from the weights)")
    parser.add_argument(
        "--perturbations",
        default=None,
        help="comma-separated subset of: stain, brightness, contrast, gamma, jpeg, blur, resample (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the random stain/brightness/contrast/gamma directions (default: 0)")
    parser.add_argument("--top-k", default="1,3,5,10", help="comma-separated k of the top-k accuracies (default: 1,3,5,10)")
    parser.add_argument("--max-tiles", type=int, default=None, metavar="N", help="use the first N tiles (sorted) only")
    parser.add_argument("--examples", type=int, default=2, metavar="N", help="tiles shown with their variants (default: 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1... (default: auto)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="forward-pass precision (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None, help=batch_size_help())
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)")
    group = parser.add_argument_group("weights")
    group.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repo(s)")
    group.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the stored login)")
    group.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    group.add_argument("--offline", action="store_true", help="use only cached or local files")
    parser.set_defaults(run=run, parser=parser)


def _int_list(value: str, name: str, parser: argparse.ArgumentParser) -> List[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{name} must be comma-separated integers, got {value!r}")
    if not values:
        parser.error(f"{name} is empty")
    return values


def model_labels(weights: Sequence[Optional[str]], labels: Optional[Sequence[str]]) -> List[str]:
    """Report names for the models: the given labels, else the weights' last path part, made unique."""
    if labels:
        if len(labels) != len(weights):
            raise EvaluationInputError(f"got {len(labels)} --label for {len(weights)} --weights; give one label per model")
        if len(set(labels)) != len(labels):
            raise EvaluationInputError(f"--label values must be unique, got {list(labels)}")
        return list(labels)
    names: List[str] = []
    for w in weights:
        base = "H0-mini" if w is None else (Path(str(w).rstrip("/")).name or str(w))
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    from ..eval.perturb import PERTURBATIONS

    parser: argparse.ArgumentParser = args.parser
    ks = _int_list(args.top_k, "--top-k", parser)
    perturbations = None
    if args.perturbations:
        perturbations = [p.strip() for p in args.perturbations.split(",") if p.strip()]
        unknown = [p for p in perturbations if p not in PERTURBATIONS]
        if unknown:
            parser.error(f"unknown perturbation(s) {unknown}; choose from {', '.join(PERTURBATIONS)}")
    if args.max_tiles is not None and args.max_tiles < 1:
        parser.error("--max-tiles must be >= 1")

    check_device(args.device)
    import h0mini
    from ..eval.report import load_tiles, robustness_report
    from ..writers import check_writable

    # Bad paths fail before any model loads; only the tiles kept by --max-tiles are decoded.
    images, names = load_tiles(args.tiles, max_tiles=args.max_tiles)
    check_writable(Path(args.output), folder=True)
    weights: List[Optional[str]] = list(args.weights) if args.weights else [None]
    labels = model_labels(weights, args.label)
    models: Dict[str, Callable] = {}
    for label, w in zip(labels, weights):
        model = h0mini.load_model(
            w,
            device=args.device,
            revision=args.revision,
            token=args.token,
            cache_dir=args.cache_dir,
            local_files_only=True if args.offline else None,
        )
        warning = model.h0mini_weights.warning  # demo weights: the report's tables say so too
        models[f"{label} ({warning})" if warning else label] = _embed_fn(model, args)
    report = robustness_report(
        images,
        models,
        args.output,
        perturbations=perturbations,
        seed=args.seed,
        ks=ks,
        n_examples=args.examples,
        tile_names=names,
        progress=False if args.quiet else args.progress,
    )
    summary = report.summary()
    columns = ["model", "perturbation", "setting", "cosine_similarity"] + [f"top_{k}_accuracy" for k in ks]
    result(args, f"strongest setting of each perturbation ({len(images)} tiles):")
    result(args, summary[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    result(args, f"report: {shown(Path(args.output) / 'report.md')}")
    return 0


def _embed_fn(model, args: argparse.Namespace) -> Callable:
    import h0mini

    def embed(images):
        return h0mini.embed_tiles(
            images,
            model=model,
            embedding="cls",
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            num_workers=0,
            progress=False,
        )

    return embed


__all__ = ["add_parser", "run", "model_labels"]
