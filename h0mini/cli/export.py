"""``h0mini export``: an ONNX folder of the model, validated on real tiles; int8 only if it passes the gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import shown
from . import _Deprecated, add_weights_arguments, result, usage_error, weights_options
from .paths import check_output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the model to ONNX (fp32, or int8 behind an accuracy gate)",
        description=(
            "Export the model to an ONNX folder (model.onnx, h0mini_export.json, README.md) and check ONNX "
            "Runtime against torch fp32 on real tiles. With --quantize int8: ONNX Runtime static QDQ int8, "
            "calibrated on --calibration tiles and written only if, on held-out tiles (every 3rd), the CLS "
            "cosine to fp32 is >= 0.995 everywhere and >= 0.999 on average and no tile depends on its batch. "
            "Use the folder with 'h0mini embed --weights FOLDER' or load_model('FOLDER'). Needs h0mini[onnx]."
        ),
        epilog="examples: h0mini export -o h0mini-onnx/   |   h0mini export -o h0mini-int8/ --quantize int8 --calibration my_tiles/",
    )
    parser.add_argument("-o", "--output-dir", metavar="DIR",
                        help="folder to create (must not exist, or be empty)")
    parser.add_argument("--output", dest="output_dir", action=_Deprecated, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default=None, choices=("int8",), help="int8 static QDQ, only if it passes the gate")
    parser.add_argument("--calibration", default=None, metavar="TILES",
                        help="tiles to validate (and calibrate int8) on: folder, glob or list file "
                             "(default: 7 CC0 tiles shipped with h0mini; for int8 use at least 48 of your own)")
    parser.add_argument("--max-tiles", type=int, default=64, help="tiles used at most, spread over TILES (default: 64)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    add_weights_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.output_dir is None:
        args.parser.error("the following arguments are required: -o/--output-dir")
    if args.max_tiles < 1:
        usage_error(f"--max-tiles must be >= 1, got {args.max_tiles}")
    check_output_folder(Path(args.output_dir), "-o")
    from ..export import export_onnx, import_onnx_packages
    from ..model import load_model

    import_onnx_packages()  # a missing extra fails before the model loads
    model = load_model(args.weights, device="cpu", **weights_options(args))
    outcome = export_onnx(model, args.output_dir, quantize=args.quantize, calibration=args.calibration,
                          max_tiles=args.max_tiles, opset=args.opset)
    result(args, outcome.fp32.summary("ONNX Runtime fp32"))
    if outcome.int8 is not None:
        result(args, outcome.int8.summary("ONNX Runtime int8 (held-out tiles)"))
    result(args, f"{shown(outcome.folder)}: {outcome.precision} ONNX export")
    return 0
