"""Benchmark: whole slide to features. Reading alone (OpenSlide, tiffslide), tissue detection, and
``embed_slide`` end to end against the model-only forward at the same precision and batch size.

Pipeline efficiency = end-to-end tiles/s / model-only tiles/s (1.0: the model never waits for the
slide). Model-only and end-to-end are timed in interleaved rounds (best of each), so the shared
machine's drift hits both alike. The slide is the CC0 example (Aperio SVS, JPEG tiles); with
``--overlap`` its 117 whole tiles become more, read from the same file.

    python benchmarks/slide_pipeline.py                       # CPU: H0-mini architecture, bf16/fp32 default
    python benchmarks/slide_pipeline.py --device cuda --overlap 192 --rounds 3
    python benchmarks/slide_pipeline.py --model h0mini_test --memory --overlap 0     # peak RSS at 117 tiles
    python benchmarks/slide_pipeline.py --model h0mini_test --memory --overlap 192   # and at 5,418
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import time

import numpy as np

import h0mini
from common import ROOT, machine, model_for, print_table, synchronize
from h0mini.embed import TileEmbedder
from h0mini.runtime import resolve_device
from h0mini.wsi import tile_slide
from model_only import forward_runner

SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"


def reading_tiles_per_second(reader: str, overlap: int, repeats: int) -> float:
    tiles = tile_slide(SLIDE, tissue=None, overlap=overlap, reader=reader)
    regions = tiles.regions()
    regions[0].load()  # open the handle outside the timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for region in regions:
            np.asarray(region.load())
        best = min(best, time.perf_counter() - start)
    return len(regions) / best


def tissue_seconds(repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tile_slide(SLIDE)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overlap", type=int, default=112, help="overlap in px: 112 gives 429 tiles (default)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of model-only vs end to end")
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--memory", action="store_true",
                        help="report the process's peak RSS (compare runs with few and many tiles)")
    parser.add_argument("--model", default="h0_mini", choices=("h0_mini", "h0mini_test"),
                        help="h0mini_test: the pipeline, not the model, is measured (memory at many tiles)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tiles: proves the script runs")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = model_for(args.smoke or args.model == "h0mini_test").to(device)
    overlap = 0 if args.smoke else args.overlap
    repeats = 1 if args.smoke else 3

    readers = ["openslide"] + (["tiffslide"] if importlib.util.find_spec("tiffslide") else [])
    reading = [{"reader": r, "tiles/s (224 px, level 0, one process)": reading_tiles_per_second(r, overlap, repeats)}
               for r in readers]
    print_table(f"Reading alone, {SLIDE.name}, {machine()}", reading)
    detection = tissue_seconds(repeats)
    print_table("Tissue detection (open, 8 µm/px thumbnail, Otsu + hysteresis, grid)", [{"seconds per slide": detection}])

    num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    embedder = TileEmbedder(model, device=device, num_workers=num_workers)
    tiles = tile_slide(SLIDE, tissue=None, overlap=overlap)
    count = len(tiles)
    forward = forward_runner(model, device, embedder.precision, embedder.batch_size, False)
    batches = -(-count // embedder.batch_size)
    embed = lambda: h0mini.embed_slide(SLIDE, embedder, tissue=None, overlap=overlap, progress=False)  # noqa: E731
    embed()  # warm-up: worker start, allocator, autocast caches
    best_model, best_e2e = float("inf"), float("inf")
    for _ in range(1 if args.smoke else args.rounds):
        start = time.perf_counter()
        for _ in range(batches):
            forward()
        synchronize(device)
        best_model = min(best_model, time.perf_counter() - start)
        start = time.perf_counter()
        result = embed()
        synchronize(device)
        best_e2e = min(best_e2e, time.perf_counter() - start)
    rows = [{
        "tiles": f"{count} (overlap {overlap})",
        "precision, batch": f"{embedder.precision}, b{embedder.batch_size}",
        "model only tiles/s": batches * embedder.batch_size / best_model,
        "slide to features tiles/s": len(result) / best_e2e,
        "pipeline efficiency": (len(result) / best_e2e) / (batches * embedder.batch_size / best_model),
    }]
    if args.memory:
        rows[0]["peak RSS MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(f"Slide to features, {machine()}", rows)
    return reading + rows


if __name__ == "__main__":
    main()
