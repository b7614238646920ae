"""``h0mini embed``: tile files in, one embedding file out; resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..embed import OUTPUTS, TileEmbedder
from ..job import embed_to_file, gather_tiles
from ..model import load_model
from ..writers import FORMATS, check_format
from . import add_weights_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed tiles into an .h5/.npy/.pt/.parquet file",
        description=(
            "Embed image tiles with H0-mini. INPUT is an image file, a folder (its image files), a glob "
            "('tiles/*.png') or a .txt/.csv list of paths. Rerunning the same command after an "
            "interruption embeds only the missing tiles."
        ),
        epilog="example: h0mini embed examples/tiles -o features.h5",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="tile files, folders, globs or list files")
    parser.add_argument("-o", "--output", required=True, help=f"output file ({', '.join(FORMATS)})")
    parser.add_argument("--output-mode", default="cls+mean", choices=OUTPUTS, help="what to store (default: cls+mean)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1... (default: auto)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    parser.add_argument("--num-workers", default="auto", help="decoding worker processes (default: auto)")
    parser.add_argument("--input-size", default=None, help="224 (default: the model's), another multiple of 14, or native")
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="on a bad tile: stop, or skip and report it")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (large jobs on GPU)")
    parser.add_argument("--save-every", type=int, default=1024, metavar="N", help="save progress every N tiles (default: 1024)")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    try:
        check_format(output, args.output_mode)
        input_size = _input_size(args.input_size)
        num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    except ValueError as error:
        args.parser.error(str(error))
    tiles = gather_tiles(args.inputs)  # bad paths fail before the model loads
    model = load_model(
        args.weights,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
    )
    embedder = TileEmbedder(
        model,
        output=args.output_mode,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        num_workers=num_workers,
        input_size=input_size,
        compile=args.compile,
    )
    result = embed_to_file(tiles, output, embedder, on_error=args.on_error, part_size=args.save_every)
    for item in result.skipped:
        print(f"skipped tile {item['index']} ({item['path']}): {item['reason']}", file=sys.stderr)
    reused = f", {result.reused} reused from an earlier run" if result.reused else ""
    print(f"{output}: {result.embedded + result.reused} tiles ({result.embedded} embedded{reused}, {len(result.skipped)} skipped)")
    return 0


def _input_size(value):
    if value is None or value == "native":
        return value
    return int(value)
