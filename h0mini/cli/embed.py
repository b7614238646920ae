"""``h0mini embed``: tile files in, one embedding file out; resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import shown
from . import (add_embedding_arguments, add_weights_arguments, check_device, embedder_options, parse_embedding_arguments,
               progress, result, usage_error, weights_options)
from .choices import FORMATS
from .paths import check_output_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed tiles into an .h5/.npy/.pt/.parquet file",
        description=(
            "Embed image tiles with H0-mini. INPUT is an image file, a folder (its image files), a glob "
            "('tiles/*.png') or a .txt/.csv list of paths. Rerunning the same command after an "
            "interruption embeds only the missing tiles; when nothing is missing it stops before loading the model."
        ),
        epilog="example: h0mini embed examples/tiles -o features.h5",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="tile files, folders, globs or list files")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help=f"output file ({', '.join(FORMATS)})")
    add_embedding_arguments(parser)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                           help="on a bad tile: stop, or skip and report it")
    run_group.add_argument("--save-every", type=int, default=1024, metavar="N",
                           help="save progress every N tiles (default: 1024)")
    run_group.add_argument("--overwrite", action="store_true",
                           help="replace an output or saved batches made with other settings (default: stop and name "
                                "the setting that differs)")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    parse_embedding_arguments(args)  # every usage error before torch and the model load
    if args.save_every < 1:
        usage_error(f"--save-every must be >= 1, got {args.save_every}")
    check_output_file(output, "-o")
    from ..writers import check_format, check_writable

    try:
        check_format(output, args.embedding)
    except ValueError as error:
        usage_error(str(error))
    check_device(args.device)
    from ..job import embed_to_file, gather_tiles

    tiles = gather_tiles(args.inputs)  # bad paths fail before the model loads
    check_writable(output)  # and an output that cannot be written
    from .already_done import finished_output

    done = finished_output(output, tiles, args)
    if done is not None:  # nothing left to do: decided from the recorded weights identity, no model loaded
        result(args, f"{shown(output)}: {done} tiles, already done (nothing to embed)")
        return 0
    from ..embed import TileEmbedder
    from ..model import load_model

    model = load_model(args.weights, device=args.device, **weights_options(args))
    try:
        embedder = TileEmbedder(model, **embedder_options(args))
    except ValueError as error:  # e.g. an input size that is not a multiple of this model's patch size
        usage_error(str(error))
    outcome = embed_to_file(tiles, output, embedder, on_error=args.on_error, part_size=args.save_every,
                            overwrite=args.overwrite, progress=progress(args))
    for item in outcome.skipped if not args.quiet else ():  # recorded in the output either way
        print(f"skipped tile {item['index']} ({shown(item['path'])}): {item['reason']}", file=sys.stderr)
    reused = f", {outcome.reused} reused from an earlier run" if outcome.reused else ""
    result(args, f"{shown(output)}: {outcome.embedded + outcome.reused} tiles ({outcome.embedded} embedded{reused}, "
                 f"{len(outcome.skipped)} skipped)")
    return 0
