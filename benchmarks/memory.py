"""Benchmark 5: peak memory while streaming many tiles through embed_tiles' pipeline.

A generator yields tiles lazily; resident memory is sampled after each checkpoint. Flat
numbers mean the pipeline holds a bounded number of batches whatever the input length (the
returned embeddings themselves grow by D floats per tile, which is reported apart).
By default the tiny model is used so that 100,000 tiles finish in minutes on a CPU; the
pipeline, not the model, is what is measured. ``--model h0_mini`` on a GPU measures both.

    python benchmarks/memory.py --tiles 100000
    python benchmarks/memory.py --device cuda --model h0_mini --tiles 100000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import machine, make_model, print_table, write_tiles
from h0mini.embed import TileEmbedder
from h0mini.runtime import resolve_device


def rss_mib() -> float:
    """Current resident memory (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="h0mini_test")
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--source", choices=("generator", "files"), default="generator",
                        help="in-memory tiles from a generator (thread), or PNG paths (DataLoader workers)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    count = 512 if args.smoke else args.tiles
    embedder = TileEmbedder(make_model(args.model), device=device, embedding="cls")
    tile = np.asarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3)), dtype=np.uint8)
    checkpoints = sorted({count // 100, count // 10, count // 2, count} - {0})
    rows, done, kept = [], 0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.source == "files":
        folder = Path(tempfile.mkdtemp())
        files = write_tiles(folder, 64)
        tiles = [files[i % len(files)] for i in range(count)]  # paths cycle over 64 real tiles
    else:
        tiles = (tile.copy() for _ in range(count))
    for batch in embedder.iter_batches(tiles):
        done += len(batch.indices)
        kept.append(batch.features["cls"].numpy())
        if checkpoints and done >= checkpoints[0]:
            checkpoints.pop(0)
            row = {"tiles streamed": done, "RSS MiB": rss_mib(),
                   "embeddings held MiB": sum(k.nbytes for k in kept) / 2**20}
            if device.type == "cuda":
                row["peak CUDA MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(f"Memory while streaming {count} tiles from {args.source} ({args.model}), {machine()}; "
                f"peak RSS {peak:.0f} MiB", rows)
    return rows


if __name__ == "__main__":
    main()
