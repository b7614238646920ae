"""``python -m h0mini.distill`` / ``torchrun -m h0mini.distill``: parse, configure logging, train.

Exit status: 0 when the run finished or stopped cleanly to be resumed, 1 on an
h0mini error (one line on stderr; ``--debug`` shows the traceback), 2 on a usage
error, 130 when interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from ..errors import H0miniError


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m h0mini.distill",
        description="Distil a frozen pathology teacher (default H-optimus-0) into a small ViT student.",
        epilog="Example: torchrun --nproc-per-node 8 -m h0mini.distill --config my.yaml train.iterations=50000 "
               "data.sources=[/data/shards/tiles-{000000..000999}.tar]",
    )
    parser.add_argument("--config", help="YAML file overriding the defaults (configs/default.yaml lists every key)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides applied after the file, e.g. train.batch_size=256 output_dir=runs/a")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of h0mini errors")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(quiet: bool) -> None:
    """stderr on rank 0 only (other ranks: warnings and errors), DINOv2-style."""
    rank = int(os.environ.get("RANK", 0))
    level = logging.WARNING if quiet or rank != 0 else logging.INFO
    handler = _StderrHandler()
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("h0mini")
    for old in [h for h in log.handlers if getattr(h, "_h0mini_distill", False)]:
        log.removeHandler(old)
    handler._h0mini_distill = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # intermixed: "--config a.yaml x=1 -q y=2" works in any order
    args = main_parser().parse_intermixed_args(list(argv) if argv is not None else None)
    _configure_logging(args.quiet)
    try:
        from .config import load_config, _yaml

        config = load_config(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(_yaml().safe_dump(config.to_dict(), sort_keys=False))
            return 0
        from .train import train

        result = train(config)
    except H0miniError as error:
        if args.debug:
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 130 if result.interrupted and not result.finished else 0


if __name__ == "__main__":
    sys.exit(main())
