"""Benchmark 1: forward-pass throughput on synthetic input, per precision, batch size and compile.

    python benchmarks/model_only.py                      # CPU: fp32 and bf16
    python benchmarks/model_only.py --attention both     # also the kernel embed_tiles does not pick
    python benchmarks/model_only.py --device cuda --batch-sizes 64 128 256 512 --compile

The forward pass is h0mini's own (``h0mini.runtime.ModelForward``, as ``embed_tiles`` runs it:
attention kernel chosen per device and dtype, torch.compile with frozen weights on CPU).
Model FLOP utilisation (MFU) = tiles/s x 44.6 GFLOP / the dense matmul peak of the same
dtype measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, List, Sequence

import torch

from common import GFLOPS_PER_TILE, arch_of, machine, matmul_runner, model_for, print_table, synchronize, timed
from h0mini.runtime import PRECISIONS, ModelForward, prefers_explicit_attention, resolve_device


def forward_runner(model, device, precision, batch_size, compile_model=False, explicit_attention=None):
    """One forward pass of a batch of synthetic tiles, as embed_tiles runs it (inference mode, autocast)."""
    dtype = PRECISIONS[precision]
    forward = ModelForward(model, device, dtype, compile=compile_model)
    if explicit_attention is not None:
        forward.explicit_attention = explicit_attention
    with torch.inference_mode():  # as embed_tiles' inputs: compiled graphs are specialised on it
        x = torch.randn(batch_size, 3, 224, 224, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def run():
        with torch.inference_mode(), autocast:
            forward(x)

    return run


def forward_tiles_per_second(model, device, precision, batch_size, compile_model=False, repeats=3) -> float:
    run = forward_runner(model, device, precision, batch_size, compile_model)
    return batch_size / timed(run, device, repeats=repeats, warmup=2 if compile_model else 1)


def interleaved_best(runs: Sequence[Callable[[], object]], device, rounds: int) -> List[float]:
    """Best time of each run over ``rounds`` rounds that take every run in turn.

    On a shared machine the speed drifts over minutes; timing configurations one after the
    other would turn the drift into differences between them.
    """
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            synchronize(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--attention", choices=["auto", "both"], default="auto",
                        help="'both': time the fused SDPA kernel and timm's explicit attention")
    parser.add_argument("--rounds", type=int, default=4, help="timing rounds; each configuration keeps its best")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one batch size: proves the script runs")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = model_for(args.smoke).to(device)
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    batch_sizes = args.batch_sizes or ([2] if args.smoke else ([64, 128, 256, 512] if device.type == "cuda" else [4, 8, 16, 32]))
    configs = []
    for precision in precisions:
        default = prefers_explicit_attention(device, PRECISIONS[precision])
        for batch_size in batch_sizes:
            for compiled in ([False, True] if args.compile else [False]):
                for explicit in ([default, not default] if args.attention == "both" else [default]):
                    configs.append((precision, batch_size, compiled, explicit, default))
    if args.compile:  # one model compiled for every configuration: more than dynamo's default 8 graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(configs))
    runs = [forward_runner(model, device, p, b, c, e) for p, b, c, e, _ in configs]
    for run, config in zip(runs, configs):
        for _ in range(2 if config[2] else 1):  # warm-up; compiled runs compile here
            run()
    n = 512 if args.smoke else 4096
    matmuls = {p: matmul_runner(device, PRECISIONS[p] or torch.float32, n) for p in precisions}
    times = interleaved_best([*runs, *matmuls.values()], device, 1 if args.smoke else args.rounds)
    peaks = {p: 2 * n**3 / t / 1e9 for p, t in zip(matmuls, times[len(runs):])}
    rows = []
    for (precision, batch_size, compiled, explicit, default), seconds in zip(configs, times):
        tps = batch_size / seconds
        gflops = tps * GFLOPS_PER_TILE[arch_of(model)]
        rows.append({"precision": precision, "batch": batch_size, "compile": compiled,
                     "attention": ("explicit" if explicit else "fused") + (" (default)" if explicit == default else ""),
                     "tiles/s": tps, "GFLOP/s": gflops, "matmul peak": peaks[precision],
                     "MFU": gflops / peaks[precision]})
    print_table(f"Model only ({arch_of(model)}), {machine()}", rows)
    return rows


if __name__ == "__main__":
    main()
