"""``h0mini embed-slides``: whole slides in, one TRIDENT/CLAM-style .h5 per slide out; resumable, shardable."""

from __future__ import annotations

import argparse
import sys

from ..errors import shown
from . import add_embedding_arguments, add_weights_arguments, check_device, parse_embedding_arguments, usage_error
from .choices import CLAIM_TIMEOUT, MIN_TISSUE, READERS, TARGET_MPP
from .paths import check_output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed-slides",
        help="embed whole-slide images into one .h5 per slide",
        description=(
            "Tile whole-slide images at a fixed µm/px (0.5 by default: H0-mini's training resolution), keep "
            "the tiles with tissue, embed them with H0-mini and write OUTPUT_DIR/<slide>.h5 (features, coords "
            "at level 0 and the attributes TRIDENT/CLAM readers expect), a QC picture per slide and "
            "summary.csv. Rerunning skips finished slides and resumes a half-done one. Needs "
            "pip install 'h0mini[wsi]' (from a clone: pip install '.[wsi]')."
        ),
        epilog=(
            "examples:\n"
            "  h0mini embed-slides slides/*.svs -o features/\n"
            "  torchrun --nproc-per-node 4 -m h0mini embed-slides slides/ -o features/   # one GPU per process\n"
            "  sbatch --array=0-9 --wrap 'h0mini embed-slides slides/ -o features/'       # 10 shards\n"
            "  h0mini embed-slides cohort.csv -o features/     # slide,mpp,mask,name,... per row\n"
            "any number of processes, on any number of machines, may share one output folder"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("slides", nargs="+", metavar="SLIDE",
                        help="slide files, folders of slides (a DICOM folder is one slide), globs, or a manifest "
                             ".csv (columns slide, and optionally mpp, mask, name, anything else)")
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
    run_group = add_embedding_arguments(parser, device_help="; LOCAL_RANK under torchrun",
                                        workers_help="tile-reading worker processes")
    run_group.add_argument("--slide-pool", default=None, choices=("mean",), help="also store the mean of the tile features")
    run_group.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                           help="on an unreadable tile: fail that slide (the others go on), or skip the tile")
    run_group.add_argument("--save-every", type=int, default=1024, metavar="N", help="save progress every N tiles")
    run_group.add_argument("--shard", default=None, metavar="K/N",
                           help="embed only shard K of N (0-based). Default: start with this process's share under "
                                "torchrun, srun or a SLURM array, then help with the rest; claims keep each slide "
                                "to one process")
    run_group.add_argument("--overwrite", action="store_true",
                           help="replace outputs and saved batches made with other settings (default: stop and "
                                "name the setting that differs)")
    run_group.add_argument("--claim-timeout", type=float, default=CLAIM_TIMEOUT, metavar="SECONDS",
                           help="a claim from another machine whose heartbeat is older counts as dead "
                                f"(default: {CLAIM_TIMEOUT:g})")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    import signal

    parse_embedding_arguments(args)  # before torch loads
    from ..model import load_model
    from ..writers import check_writable
    from ..wsi.cohort import _check_tiling_arguments, embed_slides
    from ..wsi.manifest import slide_specs
    from ..wsi.shard import resolve_shard

    num_workers = args.num_workers
    try:  # every usage error before the model loads
        shard = resolve_shard(args.shard)
        if args.save_every < 1:
            raise ValueError(f"--save-every must be >= 1, got {args.save_every}")
        if args.claim_timeout <= 0:
            raise ValueError(f"--claim-timeout must be > 0 seconds, got {args.claim_timeout}")
        _check_tiling_arguments(args.mpp, args.target_mpp, args.overlap, args.min_tissue)
        if args.slide_pool and args.embedding not in ("cls", "mean", "cls+mean"):
            raise ValueError(f"--slide-pool needs --embedding cls, mean or cls+mean, not {args.embedding}")
    except ValueError as error:
        usage_error(_flags(str(error).splitlines()[0]))
    check_device(args.device)
    specs = slide_specs(args.slides, mpp=args.mpp)  # bad paths, manifest rows, name clashes: before the model
    from pathlib import Path

    check_output_folder(Path(args.output_dir), "-o")
    check_writable(Path(args.output_dir), folder=True)
    _show_slides_in_the_log(quiet=args.quiet)
    model = load_model(
        args.weights, revision=args.revision, token=args.token, cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
    )
    previous = signal.signal(signal.SIGTERM, _terminate)  # a scheduler's SIGTERM saves like Ctrl-C
    try:
        statuses = embed_slides(
            specs, model, output_dir=args.output_dir, shard=shard, qc=not args.no_qc, mpp=args.mpp,
            target_mpp=args.target_mpp, overlap=args.overlap, tissue=None if args.tissue == "none" else "otsu",
            min_tissue=args.min_tissue, reader=args.reader, allow_upsampling=args.allow_upsampling,
            slide_pool=args.slide_pool, embedding=args.embedding, on_error=args.on_error, save_every=args.save_every,
            overwrite=args.overwrite, claim_timeout=args.claim_timeout, device=args.device,
            precision=args.precision, batch_size=args.batch_size, num_workers=num_workers, compile=args.compile,
            input_size=args.input_size, jpeg_decode=args.jpeg_decode,
            progress=False if args.quiet else None,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    counts = {s: sum(1 for x in statuses if x.status == s) for s in ("done", "already done", "failed",
                                                                       "claimed by another process")}
    failed = counts["failed"]
    if not (args.quiet and not failed):
        parts = [f"{counts['done']} done", f"{counts['already done']} already done", f"{failed} failed"]
        if counts["claimed by another process"]:
            parts.append(f"{counts['claimed by another process']} claimed by other processes")
        skipped = sum(s.skipped_tiles for s in statuses)
        if skipped:
            parts.append(f"{skipped} tiles skipped (--on-error raise retries them)")
        where = f" [{shard.label}]" if shard.label else ""
        summary = shown(str(Path(args.output_dir) / "summary.csv"))
        print(f"{shown(args.output_dir)}{where}: " + ", ".join(parts) + f" (see {summary})",
              file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _flags(message: str) -> str:
    """Python argument names in a message, as the options of this command."""
    for word, flag in (("target_mpp", "--target-mpp"), ("min_tissue", "--min-tissue"), ("overlap", "--overlap"),
                       ("mpp", "--mpp")):
        if message.startswith(word + " "):
            return flag + message[len(word):]
    return message


def _show_slides_in_the_log(*, quiet: bool) -> None:
    """Each slide's line (done, failed, ETA) on stdout as it ends: what a cluster log keeps."""
    import logging

    log = logging.getLogger("h0mini.wsi.cohort")
    if quiet:  # errors still reach stderr through the h0mini logger
        log.handlers[:] = []
        log.setLevel(logging.NOTSET)
        log.propagate = True
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
