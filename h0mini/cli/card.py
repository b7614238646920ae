"""``h0mini card``: write a Hub model card (README.md) for a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import shown
from . import add_weights_arguments, result, usage_error, weights_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="write a Hub model card (README.md) for a checkpoint",
        description=(
            "Load the weights (which checks that they fit their architecture), then write a model card: YAML "
            "front matter (license, tags, pipeline tag, library), usage with h0mini, the embedding definition, "
            "the preprocessing and the provenance of the weights (source, revision, sha256)."
        ),
        epilog="example: h0mini card --weights ./my-student -o ./my-student/README.md --repo-id me/my-student",
    )
    parser.add_argument("-o", "--output", default="-", help="file to write (default: - for stdout)")
    parser.add_argument("--repo-id", default=None, help="Hub repo the card is for (used in the usage snippet)")
    parser.add_argument("--license", default=None, help="Hub licence id (default: that of the weights' Bioptimus repo, else other)")
    parser.add_argument("--title", default=None, help="first heading (default: the repo id)")
    parser.add_argument("--training", default=None, metavar="JSON", help="a JSON file with a training summary")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    output: Optional[Path] = None if args.output == "-" else Path(args.output)
    if output is not None and output.exists() and not args.force:
        usage_error(f"{shown(output)} exists; pass --force to overwrite it")
    training = _read_training(args.training, args.parser)
    from ..card import render_model_card
    from ..model import load_model
    from ..atomic import atomic_path
    from ..writers import check_writable

    if output is not None:
        check_writable(output)
    model = load_model(args.weights, device="cpu", **weights_options(args))
    cfg: Dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    text = render_model_card(
        model.h0mini_weights.as_dict(),
        training,
        repo_id=args.repo_id,
        license=args.license,
        title=args.title,
        embed_dim=int(getattr(model, "num_features", 0)) or None,
        preprocessing={k: cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std") if k in cfg},
    )
    if output is None:
        sys.stdout.write(text)
        return 0
    with atomic_path(output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    result(args, f"{shown(output)}: model card for {model.h0mini_weights.source}")
    return 0


def _read_training(path: Optional[str], parser: argparse.ArgumentParser) -> Optional[Dict[str, Any]]:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        parser.error(f"--training {path}: {error}")
    if not isinstance(data, dict):
        parser.error(f"--training {path}: expected a JSON object, got {type(data).__name__}")
    return data
