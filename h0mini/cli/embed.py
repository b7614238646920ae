"""``h0mini embed``: tile files in, one embedding file out; resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..embed import OUTPUTS, TileEmbedder
from ..jpeg import JPEG_DECODERS
from ..runtime import resolve_device
from ..job import embed_to_file, gather_tiles
from ..model import load_model
from ..writers import FORMATS, check_format, check_writable
from . import add_weights_arguments, batch_size_help
from ..errors import shown


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
    parser.add_argument("--batch-size", type=int, default=None, help=batch_size_help())
    parser.add_argument("--num-workers", default="auto", help="decoding worker processes (default: auto)")
    parser.add_argument("--input-size", default=None, help="224 (default: the model's), another multiple of 14, or native")
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="on a bad tile: stop, or skip and report it")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model: the first batch waits 15-30 s (CPU), later ones run ~20%% faster")
    parser.add_argument("--jpeg-decode", default="cpu", choices=JPEG_DECODERS,
                        help="device: decode JPEG tiles on the GPU (nvJPEG) instead of in the workers (default: cpu)")
    parser.add_argument("--save-every", type=int, default=1024, metavar="N", help="save progress every N tiles (default: 1024)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output or saved batches made with other settings (default: stop and name "
                             "the setting that differs)")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    try:  # every usage error before the model loads
        check_format(output, args.output_mode)
        input_size = _input_size(args.input_size)
        num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
        if num_workers != "auto" and num_workers < 0:
            raise ValueError(f"--num-workers must be 'auto' or >= 0, got {num_workers}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.save_every < 1:
            raise ValueError(f"--save-every must be >= 1, got {args.save_every}")
        resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        args.parser.error(str(error).splitlines()[0])
    tiles = gather_tiles(args.inputs)  # bad paths fail before the model loads
    check_writable(output)  # and an output that cannot be written
    model = load_model(
        args.weights,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
    )
    try:
        embedder = _embedder(model, args, num_workers, input_size)
    except ValueError as error:  # e.g. an input size that is not a multiple of this model's patch size
        args.parser.error(str(error))
    result = embed_to_file(tiles, output, embedder, on_error=args.on_error, part_size=args.save_every,
                           overwrite=args.overwrite)
    for item in result.skipped:
        print(f"skipped tile {item['index']} ({shown(item['path'])}): {item['reason']}", file=sys.stderr)
    reused = f", {result.reused} reused from an earlier run" if result.reused else ""
    print(f"{shown(output)}: {result.embedded + result.reused} tiles ({result.embedded} embedded{reused}, {len(result.skipped)} skipped)")
    return 0


def _embedder(model, args: argparse.Namespace, num_workers, input_size) -> TileEmbedder:
    return TileEmbedder(
        model,
        output=args.output_mode,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        num_workers=num_workers,
        input_size=input_size,
        compile=args.compile,
        jpeg_decode=args.jpeg_decode,
    )


def _input_size(value):
    if value is None or value == "native":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--input-size must be an integer or 'native', got {value!r}") from None
