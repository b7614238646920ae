"""``h0mini hest``: HEST-Benchmark gene-expression tasks, scored as HEST scores them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

from . import batch_size_help, check_device


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hest",
        help="HEST-Benchmark: gene expression from H&E patches (PCA + ridge, Pearson per gene)",
        description=(
            "Embed the patches of each HEST-Benchmark task folder (as published in the Hub dataset "
            "MahmoodLab/hest-bench, bench_data/<TASK>), cache the embeddings per sample in HEST's h5 layout, "
            "and score them with HEST's protocol: StandardScaler + PCA(256) + ridge (alpha 100/(256*n_genes)), "
            "Pearson r per gene on each test fold, the task score the mean over folds. Prints the leaderboard "
            "row (the mean over tasks, then each task in HEST's column order). Needs the extra h0mini[eval]."
        ),
        epilog="example: h0mini hest hest-bench/bench_data/IDC hest-bench/bench_data/PRAD -o results/ --embedding cls",
    )
    parser.add_argument("tasks", nargs="+", metavar="TASK_DIR", help="HEST-bench task folders (splits/, patches/, adata/, var_50genes.json)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="results folder: <TASK>/results_kfold.json, split<i>/results.json, embeddings/")
    parser.add_argument("--weights", default=None, help="Hub repo id, local folder or weights file (default: bioptimus/H0-mini)")
    parser.add_argument(
        "--embedding",
        default="cls",
        choices=("cls", "cls+mean", "mean"),
        help="embedding: cls (the leaderboard's, default) or cls+mean (the H0-mini paper's)",
    )
    parser.add_argument("--embeddings", default=None, metavar="DIR", help="precomputed embeddings: DIR/<TASK>/<sample_id>.h5 in HEST's layout (nothing is embedded)")
    parser.add_argument("--alpha", default=None, help="'cv': alpha by inner 5-fold CV (NOT the leaderboard protocol), or a number")
    parser.add_argument("--no-pca", action="store_true", help="ridge on the raw embeddings (NOT the leaderboard protocol)")
    parser.add_argument("--n-components", type=int, default=256, metavar="K", help="PCA components (default: 256, the leaderboard's; any other is NOT the leaderboard protocol)")
    parser.add_argument("--seed", type=int, default=1, help="PCA and ridge random_state (default: 1, HEST's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1... (default: auto)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="forward-pass precision (default: auto: fp16 on CUDA, as the leaderboard)")
    parser.add_argument("--batch-size", type=int, default=None, help=batch_size_help())
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    alpha = args.alpha
    if alpha is not None and alpha != "cv":
        try:
            alpha = float(alpha)
        except ValueError:
            parser.error(f"--alpha must be 'cv' or a number, got {args.alpha!r}")
    for task in args.tasks:
        if not (Path(task) / "splits").is_dir():
            parser.error(f"{task} is not a HEST-bench task folder (no splits/); e.g. hest-bench/bench_data/IDC")
    check_device(args.device)
    from ..eval.hest import hest_benchmark, leaderboard_row

    model = args.weights
    if args.embeddings is None:
        import h0mini

        model = h0mini.load_model(args.weights, device=args.device)  # once, for every task
    out = Path(args.output)
    scores: Dict[str, float] = {}
    protocol = ""
    for task in args.tasks:
        name = Path(task).resolve().name
        result = hest_benchmark(
            task,
            model,
            embeddings=Path(args.embeddings) / name if args.embeddings else None,
            embedding=args.embedding,
            output_dir=out / name,
            dimreduce=None if args.no_pca else "PCA",
            n_components=args.n_components,
            alpha=alpha,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
        )
        scores[name] = result["pearson_mean"]
        protocol = result["protocol"]
    columns, values = leaderboard_row(scores)
    (out / "leaderboard_row.json").write_text(json.dumps({"protocol": protocol, **dict(zip(columns, values))}, indent=4))
    print(f"# {protocol}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    print("| " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return 0
