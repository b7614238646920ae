"""Benchmark: a CPU model's threads beside DataLoader workers, one per core against the cores the workers leave.

    python benchmarks/cpu_threads.py                 # H0-mini (random weights), bf16, 1 worker, 64 tiles

h0mini leaves torch's thread count to the user. This says which count to choose: with H0-mini a
worker decoding PNG tiles is idle most of the time, so the model keeps every core; with a tiny
model (``--arch h0mini_test``) the workers are busy and one thread per core waits at every barrier
for a core a worker has taken. Configurations alternate within the run; each keeps its best round.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import h0mini
from common import machine, print_table, write_tiles
from h0mini.pipeline import available_cores
from h0mini.testing import random_model


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="h0_mini")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 8 tiles, 1 round (the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.arch, args.tiles, args.rounds, args.batch_size = "h0mini_test", 8, 1, 4
    model = random_model(args.arch)
    counts = sorted({torch.get_num_threads(), max(1, available_cores() - args.workers)}, reverse=True)
    before = torch.get_num_threads()
    best = {}
    with tempfile.TemporaryDirectory() as folder:
        tiles = write_tiles(Path(folder), args.tiles)
        try:
            for _ in range(args.rounds):
                for threads in counts:  # interleaved: drift on a shared machine hits both alike
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    h0mini.embed_tiles(tiles, model, num_workers=args.workers, batch_size=args.batch_size,
                                       precision=args.precision, device=args.device, progress=False)
                    best[threads] = max(best.get(threads, 0.0), len(tiles) / (time.perf_counter() - start))
        finally:
            torch.set_num_threads(before)
    rows = [{"model": args.arch, "workers": args.workers, "model threads": t, "tiles/s": round(best[t], 2),
             "x one per core": round(best[t] / best[counts[0]], 2)} for t in counts]
    print_table(f"{args.arch} on {machine()}, {args.precision}, batch {args.batch_size}, {args.tiles} PNG tiles, "
                f"load {os.getloadavg()[0]:.1f}", rows)
    return rows


if __name__ == "__main__":
    main()
