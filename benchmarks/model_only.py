"""Benchmark 1: forward-pass throughput on synthetic input, per precision, batch size and compile.

    python benchmarks/model_only.py                      # CPU: fp32 and bf16
    python benchmarks/model_only.py --device cuda --batch-sizes 64 128 256 512 --compile

Model FLOP utilisation (MFU) = tiles/s x 44.6 GFLOP / the dense matmul peak of the same
dtype measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from common import GFLOPS_PER_TILE, arch_of, machine, matmul_peak_gflops, model_for, print_table, timed
from h0mini.embed import PRECISIONS, resolve_device


def forward_tiles_per_second(model, device, precision, batch_size, compile_model=False, repeats=3) -> float:
    dtype = PRECISIONS[precision]
    forward = torch.compile(model.forward_features) if compile_model else model.forward_features
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def run():
        with torch.inference_mode(), autocast:
            forward(x)

    return batch_size / timed(run, device, repeats=repeats, warmup=2 if compile_model else 1)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one batch size: proves the script runs")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = model_for(args.smoke).to(device)
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    batch_sizes = args.batch_sizes or ([2] if args.smoke else ([64, 128, 256, 512] if device.type == "cuda" else [8, 16, 32]))
    peaks = {p: matmul_peak_gflops(device, PRECISIONS[p] or torch.float32, n=512 if args.smoke else 4096) for p in precisions}
    rows = []
    for precision in precisions:
        for batch_size in batch_sizes:
            for compiled in ([False, True] if args.compile else [False]):
                tps = forward_tiles_per_second(model, device, precision, batch_size, compiled, repeats=1 if args.smoke else 3)
                gflops = tps * GFLOPS_PER_TILE[arch_of(model)]
                rows.append({"precision": precision, "batch": batch_size, "compile": compiled, "tiles/s": tps,
                             "GFLOP/s": gflops, "matmul peak": peaks[precision], "MFU": gflops / peaks[precision]})
    print_table(f"Model only ({arch_of(model)}), {machine()}", rows)
    return rows


if __name__ == "__main__":
    main()
