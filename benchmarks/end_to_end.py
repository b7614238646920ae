"""Benchmarks 2-3: tiles on disk to embeddings, h0mini against the naive model-card loop.

Both run in this process on the same files and weights. The model-card loop opens each file
with PIL, applies timm's transform per image, stacks batches of 8 and runs the model in fp32
(fp16 autocast on CUDA, as the card shows). h0mini runs ``embed_tiles`` with its defaults.
Pipeline efficiency = end-to-end tiles/s / model-only tiles/s at the same precision and batch
size (1.0: the model never waits for data).

    python benchmarks/end_to_end.py --tiles 64
    python benchmarks/end_to_end.py --compile       # steady state: the warm-up run compiles
    python benchmarks/end_to_end.py --device cuda --tiles 2048
    python benchmarks/end_to_end.py --device cuda --formats jpg:224 --jpeg-decode device   # nvJPEG
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import h0mini
from common import cosine, machine, model_for, print_table, synchronize, write_tiles
from h0mini.embed import TileEmbedder
from h0mini.runtime import PRECISIONS, resolve_device
from model_only import forward_tiles_per_second


def model_card_loop(model, paths, device, precision, batch_size=8) -> np.ndarray:
    transform = create_transform(**resolve_data_config(model.pretrained_cfg, model=model))
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    rows = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
        with torch.inference_mode(), autocast:
            tokens = model(batch.to(device))
        rows.append(torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens :].mean(1)], -1).float().cpu())
    return torch.cat(rows).numpy()


def seconds(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--formats", nargs="+", default=["png:224", "jpg:224", "png:256"], help="format:size")
    parser.add_argument("--baseline-precision", default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="embed_tiles(compile=True), timed after a compiling warm-up")
    parser.add_argument("--jpeg-decode", default="cpu", choices=("cpu", "device"), help="embed_tiles(jpeg_decode=...)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and 4 tiles: proves the script runs")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = model_for(args.smoke).to(device)
    count = 4 if args.smoke else args.tiles
    baseline_precision = args.baseline_precision or ("fp16" if device.type == "cuda" else "fp32")
    embedder = TileEmbedder(model, device=device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.formats:
            fmt, size = spec.split(":")
            paths = write_tiles(Path(tmp) / spec.replace(":", "_"), count, int(size), fmt)
            embed_tiles = lambda: h0mini.embed_tiles(paths, model, device=device, progress=False,  # noqa: E731
                                                     compile=args.compile, jpeg_decode=args.jpeg_decode)
            embed_tiles() if not args.smoke else None  # warm-up: workers, allocator, autocast caches
            synchronize(device)
            baseline_s, baseline = seconds(lambda: model_card_loop(model, paths, device, baseline_precision))
            ours_s, ours = seconds(embed_tiles)
            model_tps = forward_tiles_per_second(model, device, embedder.precision, embedder.batch_size, args.compile,
                                                 repeats=1 if args.smoke else 3)
            rows.append({
                "tiles": f"{count} x {fmt} {size}px",
                f"model card ({baseline_precision}, b8) tiles/s": count / baseline_s,
                f"h0mini ({embedder.precision}, b{embedder.batch_size}{', compiled' if args.compile else ''}, "
                f"{args.jpeg_decode} JPEG decode) tiles/s": count / ours_s,
                "speed-up": baseline_s / ours_s,
                "min cosine": float(cosine(baseline, ours).min()),
                "pipeline efficiency": (count / ours_s) / model_tps,
            })
    print_table(f"End to end, {machine()}", rows)
    return rows


if __name__ == "__main__":
    main()
