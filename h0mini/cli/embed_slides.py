"""``h0mini embed-slides``: whole slides in, one TRIDENT/CLAM-style .h5 per slide out; resumable, shardable."""

from __future__ import annotations

import argparse
import sys

from ..embed import OUTPUTS
from ..model import load_model
from ..runtime import resolve_device
from ..writers import check_writable
from ..wsi.discover import find_slides
from ..wsi.embed import embed_slides
from ..wsi.grid import MIN_TISSUE, TARGET_MPP
from ..wsi.reader import READERS
from ..wsi.shard import resolve_shard
from . import add_weights_arguments, batch_size_help
from ..errors import shown


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed-slides",
        help="embed whole-slide images into one .h5 per slide",
        description=(
            "Tile whole-slide images at a fixed µm/px (0.5 by default: H0-mini's training resolution), keep "
            "the tiles with tissue, embed them with H0-mini and write OUTPUT_DIR/<slide>.h5 (features, coords "
            "at level 0 and the attributes TRIDENT/CLAM readers expect), a QC picture per slide and "
            "summary.csv. Rerunning skips finished slides and resumes a half-done one. Needs "
            "pip install 'h0mini[wsi]'."
        ),
        epilog=(
            "examples:\n"
            "  h0mini embed-slides slides/*.svs -o features/\n"
            "  torchrun --nproc-per-node 4 -m h0mini embed-slides slides/ -o features/   # one GPU per process\n"
            "  sbatch --array=0-9 --wrap 'h0mini embed-slides slides/ -o features/'       # 10 shards"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files, folders of slides or globs")
    parser.add_argument("-o", "--output-dir", required=True, help="folder for <slide>.h5, qc/ and summary.csv")
    tiling = parser.add_argument_group("tiling")
    tiling.add_argument("--mpp", type=float, default=None,
                        help="level-0 µm/px of the slides, when their metadata has none (never assumed)")
    tiling.add_argument("--target-mpp", type=float, default=TARGET_MPP, help=f"µm/px of the tiles (default: {TARGET_MPP})")
    tiling.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles (default: 0)")
    tiling.add_argument("--tissue", default="otsu", choices=("otsu", "none"), help="tissue detection (default: otsu)")
    tiling.add_argument("--min-tissue", type=float, default=MIN_TISSUE,
                        help=f"fraction of a tile that must be tissue (default: {MIN_TISSUE})")
    tiling.add_argument("--reader", default="auto", choices=READERS, help="slide library (default: auto)")
    tiling.add_argument("--allow-upsampling", action="store_true", help="accept a target finer than the slide's finest level")
    tiling.add_argument("--no-qc", action="store_true", help="do not write the QC pictures")
    run_group = parser.add_argument_group("embedding")
    run_group.add_argument("--output-mode", default="cls+mean", choices=OUTPUTS, help="what to store (default: cls+mean)")
    run_group.add_argument("--slide-pool", default=None, choices=("mean",), help="also store the mean of the tile features")
    run_group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1... (default: auto; LOCAL_RANK under torchrun)")
    run_group.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    run_group.add_argument("--batch-size", type=int, default=None, help=batch_size_help())
    run_group.add_argument("--num-workers", default="auto", help="tile-reading worker processes (default: auto)")
    run_group.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                           help="on an unreadable tile: fail that slide (the others go on), or skip the tile")
    run_group.add_argument("--compile", action="store_true", help="torch.compile the model (see h0mini embed --help)")
    run_group.add_argument("--save-every", type=int, default=1024, metavar="N", help="save progress every N tiles")
    run_group.add_argument("--shard", default=None, metavar="K/N",
                           help="embed only shard K of N (0-based); default from torchrun (RANK/WORLD_SIZE) or a "
                                "SLURM array (SLURM_ARRAY_TASK_ID/COUNT)")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    try:  # every usage error before the model loads
        shard = resolve_shard(args.shard)
        num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.save_every < 1:
            raise ValueError(f"--save-every must be >= 1, got {args.save_every}")
        if not 0 <= args.min_tissue <= 1:
            raise ValueError(f"--min-tissue must be in [0, 1], got {args.min_tissue}")
        if args.slide_pool and args.output_mode not in ("cls", "mean", "cls+mean"):
            raise ValueError(f"--slide-pool needs --output-mode cls, mean or cls+mean, not {args.output_mode}")
        resolve_device(args.device)
    except ValueError as error:
        args.parser.error(str(error).splitlines()[0])
    slides = find_slides(args.slides)  # no slides, bad paths: before the model loads
    from pathlib import Path

    check_writable(Path(args.output_dir), folder=True)
    model = load_model(
        args.weights, revision=args.revision, token=args.token, cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
    )
    statuses = embed_slides(
        slides, args.output_dir, model, shard=shard, qc=not args.no_qc, mpp=args.mpp, target_mpp=args.target_mpp,
        overlap=args.overlap, tissue=None if args.tissue == "none" else "otsu", min_tissue=args.min_tissue,
        reader=args.reader, allow_upsampling=args.allow_upsampling, slide_pool=args.slide_pool,
        output=args.output_mode, on_error=args.on_error, save_every=args.save_every, device=args.device,
        precision=args.precision, batch_size=args.batch_size, num_workers=num_workers, compile=args.compile,
    )
    failed = [s for s in statuses if s.status == "failed"]
    for status in statuses:
        detail = f": {status.error}" if status.error else f" ({status.tiles} tiles)"
        print(f"{status.status:>12}  {shown(status.slide)}{detail}", file=sys.stderr if status.error else sys.stdout)
    where = f" [{shard.label}]" if shard.label else ""
    print(f"{shown(args.output_dir)}{where}: {len(statuses) - len(failed)} of {len(statuses)} slides embedded"
          + (f", {len(failed)} failed (see summary csv)" if failed else ""))
    return 1 if failed else 0
