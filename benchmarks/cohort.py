"""Benchmark: a cohort of slides through ``embed_slides`` in one process: memory, per-slide overhead, efficiency.

Three measurements, each on synthetic small slides cut from the CC0 slide (tiled TIFFs at
0.5 µm/px, ``--tiles-per-slide`` tiles each):

1. **Memory** (``--slides``, default 1000): resident memory sampled every 50 finished slides.
   Flat means nothing of a finished slide outlives it (handles, masks, rows).
2. **Per-slide overhead** (tiny model, so that reading and bookkeeping dominate): the cohort run's
   wall time minus that of one ``embed_tiles`` stream over the same tiles (same reader, same
   batches), divided by the number of slides. Interleaved rounds; the best of each is kept.
3. **Pipeline efficiency** (``--model h0_mini``, ``--efficiency-slides``, default 50, Otsu tissue and QC
   on): the share of the cohort's wall time spent in the model's forward passes (1.0: never idle).

    python benchmarks/cohort.py                         # all three, tiny model for 1 and 2
    python benchmarks/cohort.py --slides 200 --skip-efficiency
    python benchmarks/cohort.py --device cuda --efficiency-slides 50 --batch-size 256
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

from common import ROOT, machine, make_model, print_table
import h0mini
from h0mini.runtime import resolve_device

SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_cohort(folder: Path, count: int, tiles_per_side: int) -> List[Path]:
    import tifffile

    image = Image.open(SLIDE)
    image.seek(0)
    pixels = np.asarray(image.convert("RGB"))
    side = 224 * tiles_per_side
    paths = []
    for i in range(count):
        x, y = (i * 97) % (pixels.shape[1] - side), (i * 131) % (pixels.shape[0] - side)
        path = folder / f"slide{i:05d}.tif"
        tifffile.imwrite(path, pixels[y:y + side, x:x + side].copy(), tile=(256, 256), compression="zlib",
                         photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        paths.append(path)
    return paths


class Sampler(logging.Handler):
    """Samples resident memory each time ``every`` more slides have finished (from the cohort's log)."""

    def __init__(self, every: int):
        super().__init__(logging.INFO)
        self.every, self.count, self.samples = every, 0, []
        self.started = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("[%d/%d]"):
            return  # a warning about a slide, not a slide's end
        self.count += 1
        if self.count % self.every == 0:
            self.samples.append({"slides": self.count, "rss_mib": round(rss_mib(), 1),
                                 "peak_mib": round(peak_mib(), 1),
                                 "seconds": round(time.perf_counter() - self.started, 1)})


def measure_memory(model: torch.nn.Module, slides: List[Path], work: Path, args: argparse.Namespace) -> List[Dict]:
    log = logging.getLogger("h0mini.wsi.cohort")
    sampler = Sampler(50)
    log.addHandler(sampler)
    log.setLevel(logging.INFO)
    try:
        h0mini.embed_slides(slides, model, output_dir=work / "memory", tissue="otsu", device=args.device,
                            num_workers=args.num_workers, batch_size=args.batch_size, qc=True, progress=False)
    finally:
        log.removeHandler(sampler)
    return sampler.samples


def measure_overhead(model: torch.nn.Module, slides: List[Path], work: Path, args: argparse.Namespace) -> Dict:
    tiles = [h0mini.tile_slide(p, tissue=None) for p in slides]
    regions = [r for t in tiles for r in t.regions()]
    cohort, stream = [], []
    for round_number in range(args.rounds):  # interleaved: the machine's load hits both alike
        start = time.perf_counter()
        h0mini.embed_slides(slides, model, output_dir=work / f"overhead-{round_number}", tissue=None,
                            device=args.device, num_workers=args.num_workers, batch_size=args.batch_size, qc=False,
                            progress=False)
        cohort.append(time.perf_counter() - start)
        start = time.perf_counter()
        h0mini.embed_tiles(regions, model, device=args.device, num_workers=args.num_workers,
                           batch_size=args.batch_size, progress=False)
        stream.append(time.perf_counter() - start)
    return {"slides": len(slides), "tiles": len(regions), "cohort_s": round(min(cohort), 2),
            "tile_stream_s": round(min(stream), 2),
            "overhead_s_per_slide": round((min(cohort) - min(stream)) / len(slides), 3)}


def measure_efficiency(model: torch.nn.Module, slides: List[Path], work: Path, args: argparse.Namespace) -> List[Dict]:
    """The share of the cohort's wall time the model spends in its forward passes.

    Both times come from the same run, so a shared machine's drifting load hits them alike (timing
    the model alone in a separate run swung 2-3x here). On CUDA the forward's result is copied to
    the host inside the timed call, so the GPU work is inside it.
    """
    device = resolve_device(args.device)
    busy = {"seconds": 0.0}
    original = h0mini.TileEmbedder._forward_pool

    def timed_forward(self, pixels):
        start = time.perf_counter()
        try:
            return original(self, pixels)
        finally:
            busy["seconds"] += time.perf_counter() - start

    rows = []
    h0mini.TileEmbedder._forward_pool = timed_forward
    try:
        for workers in args.efficiency_workers:
            workers = workers if workers == "auto" else int(workers)
            busy["seconds"] = 0.0
            start = time.perf_counter()
            statuses = h0mini.embed_slides(slides, model, output_dir=work / f"efficiency-{workers}", tissue="otsu",
                                           device=device, num_workers=workers, batch_size=args.batch_size, qc=True,
                                           progress=False)
            wall = time.perf_counter() - start
            tiles = sum(s.tiles for s in statuses)
            rows.append({"model": args.model, "num_workers": workers, "slides": len(slides), "tiles": tiles,
                         "wall_s": round(wall, 1), "model_busy_s": round(busy["seconds"], 1),
                         "cohort_tiles_per_s": round(tiles / wall, 2), "efficiency": round(busy["seconds"] / wall, 3)})
    finally:
        h0mini.TileEmbedder._forward_pool = original
    return rows


def plot(samples: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=120)
    axis.plot([s["slides"] for s in samples], [s["rss_mib"] for s in samples], marker="o", label="resident")
    axis.plot([s["slides"] for s in samples], [s["peak_mib"] for s in samples], linestyle="--", label="peak")
    axis.set_xlabel("slides finished")
    axis.set_ylabel("MiB")
    axis.set_ylim(bottom=0)
    axis.set_title("embed_slides: memory over a cohort, one process")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=1000, help="slides for the memory curve")
    parser.add_argument("--overhead-slides", type=int, default=20)
    parser.add_argument("--efficiency-slides", type=int, default=50)
    parser.add_argument("--efficiency-workers", nargs="+", default=["auto"],
                        help="reader workers to compare for the efficiency figure (e.g. 0 1 2)")
    parser.add_argument("--tiles-per-side", type=int, default=2, help="slides of N x N tiles (default: 2)")
    parser.add_argument("--model", default="h0_mini", help="model for the efficiency figure")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=None, help="write the memory curve as a PNG")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-efficiency", action="store_true")
    args = parser.parse_args()
    args.num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    print(machine())
    tiny = make_model("h0mini_test")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "slides").mkdir()
        count = max(args.slides if not args.skip_memory else 0, args.overhead_slides, args.efficiency_slides)
        slides = write_cohort(work / "slides", count, args.tiles_per_side)
        if not args.skip_memory:
            samples = measure_memory(tiny, slides[:args.slides], work, args)
            print_table(f"memory over {args.slides} slides (tiny model, one process)", samples)
            if samples:
                print(f"RSS growth from slide {samples[0]['slides']} to {samples[-1]['slides']}: "
                      f"{samples[-1]['rss_mib'] - samples[0]['rss_mib']:+.1f} MiB")
            if args.plot and samples:
                plot(samples, args.plot)
        print_table("per-slide overhead (tiny model)", [measure_overhead(tiny, slides[:args.overhead_slides], work,
                                                                          args)])
        if not args.skip_efficiency:
            model = make_model(args.model)
            print_table(f"pipeline efficiency ({args.model})",
                        measure_efficiency(model, slides[:args.efficiency_slides], work, args))


if __name__ == "__main__":
    main()
