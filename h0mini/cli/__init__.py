"""The ``h0mini`` command: one module per subcommand, each a thin wrapper over the library.

Results go to stdout; warnings (``warning: ...``, one line each), errors (``error: ...``, one
line) and progress to stderr; ``-q`` prints nothing on success. Exit status: 0 on success, 1 on
an h0mini error (the traceback only with ``--debug``), 2 on a usage error. Arguments are parsed
before torch is imported, so a usage error comes back at once.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
import warnings
from typing import Any, List, NoReturn, Optional, Sequence

from ..errors import H0miniError
from ..interrupt import EXIT_STATUS, exit_on_interrupt, raise_on_interrupt, started_as_command
from ..version import __version__
from ..wording import command_line_words
from .choices import DEFAULT_BATCH_SIZE, EMBEDDINGS, JPEG_DECODERS, PRECISIONS

# Subcommand modules, each with add_parser(subparsers) and run(args) -> int.
COMMANDS = ("card", "demo_weights", "download", "embed", "embed_slides", "export", "hest", "robustness")

USAGE_ERROR = 2


class UsageError(Exception):
    """A value the parser accepted but the command cannot use: one ``error:`` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with each subcommand reporting its own unknown options and the closest known one."""

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = getattr(parsed, "parser", None) or self
            parser.error(unrecognized(parser, extras))
        return parsed


def unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """``unrecognized arguments: --precison (did you mean --precision?)``."""
    options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    notes = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if name.startswith("-") else []
        notes.append(f"{extra} (did you mean {close[0]}?)" if close else extra)
    return "unrecognized arguments: " + " ".join(notes)


def usage_error(message: str) -> NoReturn:
    raise UsageError(message)


def main_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="h0mini",
        description="H0-mini pathology foundation model: download weights, embed tiles and slides, export, "
                    "check robustness, write model cards.",
    )
    parser.add_argument("--version", action="version", version=f"h0mini {__version__}")
    _add_output_options(parser, default=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    for command in subparsers.choices.values():  # -v, -q, --debug also after the command
        _add_output_options(command, default=False)
        command.set_defaults(parser=command)
    return parser


def _add_output_options(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """The main parser sets the defaults; a command's copy only sets what was typed after it."""
    kwargs = {} if default else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", help="more log output (-vv for debug)", **({"default": 0} if default else kwargs))
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing on success (errors still print)", **kwargs)
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
        with command_line_words(), warnings_as_lines(args.quiet):
            importlib.import_module("h0mini.registry")  # torch and timm load here, after parsing
            if started_as_command():  # torch is in: from here on Ctrl-C raises, and the command saves its work
                raise_on_interrupt()
            return int(args.run(args) or 0)
    except UsageError as error:
        print(f"{args.parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
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


class warnings_as_lines(warnings.catch_warnings):
    """Python warnings raised during a command print as one plain ``warning: ...`` line (none with -q)."""

    def __init__(self, quiet: bool):
        super().__init__()
        self.quiet = quiet

    def __enter__(self) -> None:
        super().__enter__()
        if self.quiet:
            warnings.simplefilter("ignore")
        warnings.showwarning = _show_warning  # restored on exit by catch_warnings


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"warning: {_one_line(message)}", file=sys.stderr)


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
    """Console-script and ``python -m h0mini`` entry.

    Until torch has loaded, Ctrl-C exits at once (``interrupt.exit_interrupted``): a KeyboardInterrupt
    raised inside torch's native start-up can abort the process (SIGABRT, or exit by SIGINT after the
    message) instead of ending it with 130. ``_main`` switches to raising once there is work to save.
    """
    code = main()
    sys.stdout.flush()
    exit_on_interrupt()  # nothing left to save while the interpreter shuts down
    sys.exit(code)


def result(args: argparse.Namespace, text: str) -> None:
    """A result line on stdout, unless -q."""
    if not getattr(args, "quiet", False):
        print(text)


def progress(args: argparse.Namespace) -> Optional[bool]:
    """Progress bars: off with -q, else on a terminal (the library's default)."""
    return False if getattr(args, "quiet", False) else None


def batch_size_help() -> str:
    """The --batch-size help of every command, from the defaults TileEmbedder applies."""
    return f"default: {DEFAULT_BATCH_SIZE['cuda']} on CUDA, {DEFAULT_BATCH_SIZE['cpu']} on CPU"


def add_weights_arguments(parser: argparse.ArgumentParser, *, default_help: str = "bioptimus/H0-mini") -> None:
    """Options every command that loads a model shares."""
    group = parser.add_argument_group("weights")
    group.add_argument("--weights", default=None,
                       help=f"Hub repo id (repo@revision too), local folder or weights file (default: H0MINI_WEIGHTS, "
                            f"else {default_help})")
    group.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repo")
    group.add_argument(
        "--token", default=None,
        help="Hugging Face token (default: HF_TOKEN or the stored login; prefer HF_TOKEN: arguments show in ps)",
    )
    group.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    group.add_argument("--offline", action="store_true", help="use only cached or local files")


def add_embedding_arguments(parser: argparse.ArgumentParser, *, device_help: str = "",
                            workers_help: str = "decoding worker processes") -> argparse._ArgumentGroup:
    """The embedding options of ``embed`` and ``embed-slides``: the names and defaults of ``embed_tiles``."""
    group = parser.add_argument_group("embedding")
    group.add_argument("--embedding", default="cls+mean", choices=EMBEDDINGS,
                       help="what to store (default: cls+mean, the model card's)")
    group.add_argument("--output-mode", dest="embedding", choices=EMBEDDINGS, action=_Deprecated,
                       help=argparse.SUPPRESS)
    group.add_argument("--device", default="auto", help=f"auto, cpu, cuda, cuda:1... (default: auto{device_help})")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast of the forward pass (default: auto: fp16 on CUDA, bf16 on CPUs with native bf16, "
                            "else fp32)")
    group.add_argument("--batch-size", type=int, default=None, help=batch_size_help())
    group.add_argument("--num-workers", default="auto", help=f"{workers_help} (default: auto)")
    group.add_argument("--input-size", default=None,
                       help="224 (default: the model's), another multiple of 14, or native")
    group.add_argument("--jpeg-decode", default="cpu", choices=JPEG_DECODERS,
                       help="device: decode JPEG tiles on the GPU (nvJPEG) instead of in the workers (default: cpu)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model: the first batch waits 15-30 s (CPU), later ones run ~20%% faster")
    return group


class _Deprecated(argparse.Action):
    """An old option name: works for one release, with a ``warning:`` line naming the new one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        new = next(a for a in parser._actions if a.dest == self.dest and a is not self).option_strings[-1]
        print(f"warning: {option_string} is deprecated and will be removed in the next release: use {new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def parse_embedding_arguments(args: argparse.Namespace) -> None:
    """Check and convert the embedding options in place, before anything loads (UsageError on a bad value)."""
    if args.num_workers != "auto":
        try:
            args.num_workers = int(args.num_workers)
        except ValueError:
            usage_error(f"--num-workers must be 'auto' or an integer >= 0, got {args.num_workers!r}")
        if args.num_workers < 0:
            usage_error(f"--num-workers must be 'auto' or >= 0, got {args.num_workers}")
    if args.batch_size is not None and args.batch_size < 1:
        usage_error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.input_size not in (None, "native"):
        try:
            args.input_size = int(args.input_size)
        except ValueError:
            usage_error(f"--input-size must be an integer or 'native', got {args.input_size!r}")


def check_device(device: str) -> None:
    """``--device``: one line, no usage dump, when it names hardware this machine lacks."""
    from ..runtime import resolve_device  # imports torch

    try:
        resolve_device(device)
    except (ValueError, RuntimeError) as error:
        usage_error(str(error).splitlines()[0])


def embedder_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of TileEmbedder / embed_slides that the embedding options give."""
    return dict(embedding=args.embedding, batch_size=args.batch_size, device=args.device, precision=args.precision,
                num_workers=args.num_workers, input_size=args.input_size, compile=args.compile,
                jpeg_decode=args.jpeg_decode)


def weights_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of load_model that the weights options give."""
    return dict(revision=args.revision, token=args.token, cache_dir=args.cache_dir,
                local_files_only=True if args.offline else None)


__all__: List[str] = ["main", "main_parser", "entrypoint", "add_weights_arguments", "add_embedding_arguments",
                      "batch_size_help", "usage_error", "UsageError", "result"]
