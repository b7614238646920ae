"""``h0mini demo-weights``: a random full-size checkpoint, to try every command before gated access is granted."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import DEMO_WEIGHTS_LABEL, H0_MINI_ARCH
from ..errors import shown
from . import result, usage_error


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-weights",
        help=f"write a full-size H0-mini checkpoint with {DEMO_WEIGHTS_LABEL}",
        description=(
            "Write config.json, model.safetensors and README.md (the Hub layout) holding an H0-mini with random, "
            "trained-like weights: the real architecture, shapes and speed, meaningless numbers. Pass the folder as "
            f"--weights DIR (or H0MINI_WEIGHTS=DIR) to any command. {DEMO_WEIGHTS_LABEL.capitalize()}: the config, "
            "the card and every output's provenance say so, and loading it warns."
        ),
        epilog="example: h0mini demo-weights h0mini-demo && h0mini embed examples/tiles -o demo.h5 --weights h0mini-demo",
    )
    parser.add_argument("folder", type=Path, help="folder to write (created; must not hold a checkpoint already)")
    parser.add_argument("--arch", default=H0_MINI_ARCH, help=f"architecture (default: {H0_MINI_ARCH})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint already in the folder")
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    from ..testing import write_demo_weights  # builds an 86M-parameter model: imported only when asked

    if (args.folder / "model.safetensors").exists() and not args.force:
        usage_error(f"{shown(args.folder)} already holds model.safetensors; pass --force to overwrite it")
    folder = write_demo_weights(args.folder, arch=args.arch, seed=args.seed)
    absolute = shown(Path(folder).resolve())
    result(args, f"{shown(folder)}: {args.arch} checkpoint with {DEMO_WEIGHTS_LABEL}")
    result(args, f"next: h0mini embed TILES -o embeddings.h5 --weights {absolute}   (or export H0MINI_WEIGHTS={absolute})")
    return 0
