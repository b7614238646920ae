"""The ``h0mini`` command: one module per subcommand, each a thin wrapper over the library.

Results go to stdout, logs and progress to stderr. Exit status: 0 on success,
1 on an h0mini error (one line; the traceback only with ``--debug``), 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional, Sequence

from ..errors import H0miniError
from ..interrupt import EXIT_STATUS, exit_on_interrupt, raise_on_interrupt
from ..version import __version__
from ..wording import command_line_words

# Subcommand modules, each with add_parser(subparsers) and run(args) -> int.
COMMANDS = ("card", "demo_weights", "download", "embed", "embed_slides", "export", "robustness")


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="h0mini",
        description="H0-mini pathology foundation model: download weights, embed tiles, check robustness, write model cards.",
    )
    parser.add_argument("--version", action="version", version=f"h0mini {__version__}")
    _add_output_options(parser, default=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    for command in subparsers.choices.values():  # -v, -q, --debug also after the command
        _add_output_options(command, default=False)
    return parser


def _add_output_options(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """The main parser sets the defaults; a command's copy only sets what was typed after it."""
    kwargs = {} if default else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", help="more log output (-vv for debug)", **({"default": 0} if default else kwargs))
    group.add_argument("-q", "--quiet", action="store_true", help="only errors", **kwargs)
    group.add_argument("--debug", action="store_true", help="show tracebacks (also HF_DEBUG=1)", **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_STATUS


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = main_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    _configure_logging(args.verbose, args.quiet)
    debug = args.debug or os.environ.get("HF_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        with command_line_words():
            return int(args.run(args) or 0)
    except H0miniError as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # an output folder that cannot be written, a disk that is full
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("h0mini")
    root.handlers[:] = [handler]
    root.setLevel(level)


def entrypoint() -> None:
    """Console-script and ``python -m h0mini`` entry."""
    raise_on_interrupt()  # the command saves its finished batches on KeyboardInterrupt
    code = main()
    sys.stdout.flush()
    exit_on_interrupt()  # nothing left to save while the interpreter shuts down
    sys.exit(code)


def batch_size_help() -> str:
    """The --batch-size help of every command, from the defaults TileEmbedder applies."""
    from ..embed import DEFAULT_BATCH_SIZE

    return f"default: {DEFAULT_BATCH_SIZE['cuda']} on CUDA, {DEFAULT_BATCH_SIZE['cpu']} on CPU"


def add_weights_arguments(parser: argparse.ArgumentParser, *, default_help: str = "bioptimus/H0-mini") -> None:
    """Options every command that loads a model shares."""
    group = parser.add_argument_group("weights")
    group.add_argument("--weights", default=None, help=f"Hub repo id, local folder or weights file (default: {default_help})")
    group.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repo")
    group.add_argument(
        "--token", default=None,
        help="Hugging Face token (default: HF_TOKEN or the stored login; prefer HF_TOKEN: arguments show in ps)",
    )
    group.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    group.add_argument("--offline", action="store_true", help="use only cached or local files")


__all__: List[str] = ["main", "main_parser", "entrypoint", "add_weights_arguments", "batch_size_help"]
