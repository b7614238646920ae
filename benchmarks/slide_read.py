"""Benchmark: slide -> features with the stored-tile reader (h0mini.wsi.stored_tiles) against the
DataLoader-over-OpenSlide-``read_region`` baseline, same workers, interleaved rounds (best of each).

Slides: a 40x pyramid (0.25 µm/px level 0, 4x levels, 256 px JPEG tiles coded RGB as Aperio does),
made from the CC0 slide upscaled 2x; and the CC0 SVS itself (read at its own level). The model is
the tiny ``h0mini_test`` so reading dominates. Also: pixels and embeddings of both readers, the
reading cost of one process (per-core figure: how many cores feed an H200 at 5,000-10,000 tiles/s),
DCT-domain scaling's pixel difference, and peak RSS on a 100,000 x 100,000 px slide against a
small one (a hand-written TIFF whose tile table cycles over 16 real tiles: 1.2 MB on disk).

    python benchmarks/slide_read.py                          # CPU, 1 and 2 workers
    python benchmarks/slide_read.py --device cuda --workers 16 --batch-size 256 --precision float16 --gpu-decode
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import h0mini
from common import ROOT, cosine, machine, model_for, print_table
from h0mini.wsi import stored_tiles, tile_slide

CC0 = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"
TILE = 256
FLOPS_PER_TILE = 44.6e9  # H0-mini forward at 224 px (the figure)


def jpeg_tiles(level: np.ndarray, quality: int = 80):
    import imagecodecs

    for y in range(0, level.shape[0], TILE):
        for x in range(0, level.shape[1], TILE):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = level[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield imagecodecs.jpeg8_encode(tile, level=quality, colorspace="rgb", outcolorspace="rgb")


def write_40x_pyramid(path: Path, upscale: int = 2, repeat: int = 1, crop: int = 0) -> Path:
    """0.25 µm/px level 0 (the CC0 slide's 0.499 µm/px upscaled, ``repeat`` x ``repeat`` copies), levels at
    4x and 16x, JPEG tiles."""
    import tifffile

    base = Image.open(CC0).convert("RGB")
    if crop:
        base = base.crop((0, 0, crop, crop))
    level0 = base.resize((base.width * upscale, base.height * upscale), Image.Resampling.BICUBIC)
    if repeat > 1:
        level0 = Image.fromarray(np.tile(np.asarray(level0), (repeat, repeat, 1)))
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate((1, 4, 16)):
            level = np.asarray(level0.resize((level0.width // factor, level0.height // factor), Image.Resampling.BOX)
                               if factor > 1 else level0)
            tif.write(jpeg_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                      photometric="rgb", subfiletype=1 if i else 0, resolution=(1e4 / (0.25 * factor),) * 2,
                      resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+") as tif:  # RGB-coded JPEG data, labelled RGB, as in SVS
        for page in tif.pages:
            page.tags["PhotometricInterpretation"].overwrite(2)
    return path


def write_huge_slide(path: Path, side: int = 100_000, mpp: float = 0.25) -> Path:
    """A one-level side x side px tiled JPEG TIFF whose tile table cycles over 16 real tiles."""
    base = np.asarray(Image.open(CC0).convert("RGB"))
    real = list(jpeg_tiles(base[:1024, :1024]))  # 16 tiles of tissue
    columns = -(-side // TILE)
    count = columns * columns
    blob = b"".join(real)
    starts = np.cumsum([0] + [len(t) for t in real[:-1]]) + 8
    offsets = np.resize(starts, count).astype("<u4")
    counts = np.resize([len(t) for t in real], count).astype("<u4")
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, None), (259, 3, 1, 7), (262, 3, 1, 2),
               (277, 3, 1, 3), (282, 5, 1, None), (283, 5, 1, None), (284, 3, 1, 1), (296, 3, 1, 3),
               (322, 3, 1, TILE), (323, 3, 1, TILE), (324, 4, count, None), (325, 4, count, None)]
    ifd_at = 8 + len(blob)
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    extras = {258: struct.pack("<3H", 8, 8, 8), 282: struct.pack("<2I", int(1e4 / mpp), 1),
              283: struct.pack("<2I", int(1e4 / mpp), 1), 324: offsets.tobytes(), 325: counts.tobytes()}
    ifd, tail = [struct.pack("<H", len(entries))], []
    for tag, kind, n, value in entries:
        if value is None:
            ifd.append(struct.pack("<HHII", tag, kind, n, extra_at + sum(len(t) for t in tail)))
            tail.append(extras[tag])
        else:
            ifd.append(struct.pack("<HHIHH", tag, kind, n, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, n, value))
    ifd.append(struct.pack("<I", 0))
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_at) + blob + b"".join(ifd) + b"".join(tail))
    return path


def use_stored(on: bool) -> None:
    os.environ["H0MINI_STORED_TILES"] = "1" if on else "0"


def embed(tiles, model, workers, args, stored, gpu_decode=False):
    use_stored(stored)
    stored_tiles.release(tiles.source.path)  # no warm cache forked into the workers
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(model_threads(workers, args))  # every reader alike: see model_threads
    try:
        start = time.perf_counter()
        features = h0mini.embed_tiles(tiles, model, num_workers=workers, batch_size=args.batch_size,
                                      device=args.device, precision=args.precision, progress=False, embedding="cls",
                                      jpeg_decode="device" if gpu_decode else "cpu")
        return len(tiles) / (time.perf_counter() - start), np.asarray(features, np.float32)
    finally:
        torch.set_num_threads(before)


def model_threads(workers: int, args) -> int:
    """The model's threads in these rows: on a CPU, the cores the ``workers`` leave.

    This benchmark measures reading. On a GPU machine the model does not compete with the readers
    for cores; on a few CPU cores a tiny model with one thread per core would (every operator waiting
    at its barrier for a thread a worker has taken), so the model is pinned to what the workers leave,
    for the baseline and the stored-tile reader alike. h0mini itself leaves torch's thread count to
    the user: for H0-mini on 2 idle cores, 2 threads beside 1 worker ran 13.4 tiles/s, 1 thread 8.4
    (benchmarks/cpu_threads.py)."""
    import torch

    from h0mini.pipeline import available_cores

    if args.device.startswith("cuda") or workers == 0:
        return torch.get_num_threads()
    return min(torch.get_num_threads(), max(1, available_cores() - workers))


def consumer_alone(pixels, model, threads, args) -> float:
    """The main process's side of slide -> features by itself: the same tiles already read (uint8 in memory),
    batched, normalised, embedded and copied out by ``embed_tiles`` at the model's thread count in the
    pipeline. No reading: the ceiling of any reader at this thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        h0mini.embed_tiles(pixels, model, num_workers=0, batch_size=args.batch_size, device=args.device,
                           precision=args.precision, progress=False, embedding="cls")
        return len(pixels) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


CONSUMER = "consumer alone (tiles pre-read, no reader)"


def pipeline_rows(name, tiles, model, args):
    modes = [("openslide read_region", False, False), ("stored tiles", True, False)]
    if args.gpu_decode:
        modes.append(("stored tiles, GPU decode", True, True))
    use_stored(True)
    pixels = np.stack([np.asarray(r.load()) for r in tiles.regions()])  # for the consumer-alone line
    best, features, rows, loads = {}, {}, [], {}
    for workers in args.workers:
        for _ in range(args.rounds):
            for label, stored, gpu in modes:  # interleaved: drift on the shared machine hits all alike
                rate, feats = embed(tiles, model, workers, args, stored, gpu)
                best[(workers, label)] = max(best.get((workers, label), 0.0), rate)
                features[label] = feats
            rate = consumer_alone(pixels, model, model_threads(workers, args), args)
            best[(workers, CONSUMER)] = max(best.get((workers, CONSUMER), 0.0), rate)
            loads.setdefault(workers, []).append(os.getloadavg()[0])
    baseline = features["openslide read_region"]
    for workers in args.workers:
        base_rate = best[(workers, "openslide read_region")]
        for label in [m[0] for m in modes] + [CONSUMER]:
            rate = best[(workers, label)]
            row = {"slide": name, "workers": workers, "model threads": model_threads(workers, args), "reader": label,
                   "tiles/s": round(rate, 1), "x baseline": round(rate / base_rate, 2),
                   "min cos vs baseline": round(float(cosine(features[label], baseline).min()), 6) if label in features else "-",
                   "load avg (rounds)": " ".join(f"{v:.1f}" for v in loads[workers])}
            if args.device.startswith("cuda"):
                row["MFU"] = round(rate * FLOPS_PER_TILE / args.peak_flops, 3)
                row["slides/h (15k tiles)"] = round(rate * 3600 / 15_000, 1)
            rows.append(row)
    return rows


def model_alone(model, args, threads=None) -> float:
    """The model's forward on random input at the same batch size (and, on a CPU, the thread count the
    pipeline gives it next to its workers): the ceiling of the pipeline, reading and batching aside."""
    import torch

    from h0mini.runtime import resolve_device

    device = resolve_device(args.device)
    net = model.to(device).eval()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.precision)
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    best = float("inf")
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for _ in range(4):
                start = time.perf_counter()
                net.forward_features(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return args.batch_size / best


def pixels_identical(tiles) -> dict:
    use_stored(False)
    base = [np.asarray(r.load()) for r in tiles.regions()]
    use_stored(True)
    stored_tiles.release(tiles.source.path)
    fast = [np.asarray(r.load()) for r in tiles.regions()]
    assert stored_tiles.cache_info()["tiles"] > 0, "the stored-tile path was not taken"
    same = sum(bool(np.array_equal(a, b)) for a, b in zip(base, fast))
    coords = tile_slide(tiles.source.path, tissue=None, overlap=tiles.plan.overlap).coords
    return {"tiles": len(base), "pixel-identical": same, "coords unchanged": bool(np.array_equal(coords, tiles.coords))}


def gpu_pixels_identical(tiles, model, args) -> int:
    import torch

    from h0mini.jpeg import decode_on_device
    from h0mini.preprocess import Preprocessing

    use_stored(True)
    preprocessing = Preprocessing.from_model(model)
    regions = tiles.regions()
    decoded = decode_on_device([r.encoded_for_device(preprocessing) for r in regions], torch.device(args.device))
    return sum(t is not None and bool(np.array_equal(t.permute(1, 2, 0).cpu().numpy(), np.asarray(r.load())))
               for r, t in zip(regions, decoded))


def reading_per_process(tiles, preprocessing, repeats) -> dict:
    """One process reading and preparing tiles (what one DataLoader worker does per tile)."""
    result: dict = {}
    modes = [("openslide read_region", False, False), ("stored tiles", True, False), ("stored tiles, DCT 1/2", True, True)]
    for _ in range(repeats):
        for label, stored, dct in modes:  # interleaved
            use_stored(stored)
            os.environ["H0MINI_JPEG_SCALING"] = "dct" if dct else ""
            stored_tiles.release(tiles.source.path)
            start, cpu = time.perf_counter(), time.process_time()
            for region in tiles.regions():
                preprocessing.prepare(region)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            best = result.get(label, (0.0, 0.0))
            result[label] = (max(best[0], len(tiles) / wall), max(best[1], len(tiles) / cpu))
    os.environ["H0MINI_JPEG_SCALING"] = ""
    return result  # label: (tiles per wall second, tiles per CPU second)


def dct_difference(tiles, model, args) -> dict:
    use_stored(True)
    os.environ["H0MINI_JPEG_SCALING"] = ""
    box = np.stack([np.asarray(r.load()) for r in tiles.regions()]).astype(np.int16)
    stored_tiles.release(tiles.source.path)
    os.environ["H0MINI_JPEG_SCALING"] = "dct"
    dct = np.stack([np.asarray(r.load()) for r in tiles.regions()]).astype(np.int16)
    f_dct = np.asarray(h0mini.embed_tiles(tiles, model, num_workers=0, batch_size=args.batch_size, device=args.device,
                                          progress=False, embedding="cls"), np.float32)
    os.environ["H0MINI_JPEG_SCALING"] = ""
    f_box = np.asarray(h0mini.embed_tiles(tiles, model, num_workers=0, batch_size=args.batch_size, device=args.device,
                                          progress=False, embedding="cls"), np.float32)
    diff = np.abs(dct - box)
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {"mean |diff|": round(float(diff.mean()), 3), "max |diff|": int(diff.max()),
            "PSNR dB": round(10 * np.log10(255**2 / mse), 2), "min cos (h0mini_test)": round(float(cosine(f_dct, f_box).min()), 5)}


PEAK_RSS = r"""
import json, os, sys
import numpy as np
os.environ["H0MINI_STORED_TILES"] = sys.argv[2]
from h0mini.wsi import tile_slide, stored_tiles

def hwm():  # peak RSS of this process (VmHWM starts afresh at exec, unlike ru_maxrss)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

tiles = tile_slide(sys.argv[1], tissue=None)
step = max(1, len(tiles) // int(sys.argv[3]))
np.asarray(tiles[0].load())
before = hwm()
for i in range(0, len(tiles), step):
    np.asarray(tiles[i].load())
info = stored_tiles.cache_info()
print(json.dumps({"grid": len(tiles), "read": len(range(0, len(tiles), step)), "before": before, "peak": hwm(),
                  "cache": info["bytes"]}))
"""


def peak_rss(small: Path, huge: Path, reads: int) -> list:
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for stored in ("0", "1"):
        for name, path in (("small (4,440 x 5,934)", small), ("huge (100,000 x 100,000)", huge)):
            out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), stored, str(reads)], capture_output=True,
                                 text=True, env=env, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            rows.append({"reader": "stored tiles" if stored == "1" else "openslide read_region", "slide": name,
                         "grid tiles": got["grid"], "tiles read": got["read"],
                         "peak RSS MiB": round(got["peak"], 1),
                         "rise while reading MiB": round(got["peak"] - got["before"], 1),
                         "decoded-tile cache MiB": round(got["cache"] / 2**20, 1)})
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--overlap", type=int, default=112, help="px at 0.5 µm/px: 112 gives 450 tiles on the 40x pyramid")
    parser.add_argument("--gpu-decode", action="store_true", help="also time jpeg_decode='device' (CUDA)")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="for MFU: H200 dense fp16/bf16")
    parser.add_argument("--rss-reads", type=int, default=2000)
    parser.add_argument("--model", default="h0mini_test", choices=["h0mini_test", "h0_mini"],
                        help="h0_mini (random weights) for MFU on a GPU")
    parser.add_argument("--skip-cc0", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="the 40x slide is repeat x repeat copies (GPU: 4, 2,028 tiles)")
    parser.add_argument("--smoke", action="store_true", help="a quick run (CI): 1 worker, 1 round, no RSS")
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.rounds, args.overlap, args.skip_cc0 = [1], 1, 0, True
    model = model_for(smoke=True)
    with tempfile.TemporaryDirectory() as folder:
        pyramid = write_40x_pyramid(Path(folder) / "pyramid40x.tif", repeat=args.repeat, crop=700 if args.smoke else 0)
        tiles40 = tile_slide(pyramid, tissue=None, overlap=args.overlap)
        cc0 = tile_slide(CC0, tissue=None, overlap=args.overlap)
        print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
        print(f"40x pyramid: {tiles40!r}\nCC0 SVS: {cc0!r}")
        if args.model == "h0_mini":
            model = model_for(smoke=False)
        threads = sorted({model_threads(w, args) for w in args.workers})
        ceiling = {t: model_alone(model, args, t) for t in threads}
        rows = pipeline_rows("40x pyramid", tiles40, model, args)
        if not args.skip_cc0:
            rows += pipeline_rows("CC0 SVS (own level)", cc0, model, args)
        ceiling = {t: max(rate, model_alone(model, args, t)) for t, rate in ceiling.items()}
        print_table(f"slide -> features ({args.model}; best of interleaved rounds; the consumer-alone row is the "
                    "same pipeline over the tiles already read)", rows)
        for t, rate in ceiling.items():
            print(f"{args.model} forward_features alone (random input, batch {args.batch_size}, {t} thread(s)): "
                  f"{rate:.1f} tiles/s")
        slides = [("40x pyramid", tiles40)] + ([] if args.skip_cc0 else [("CC0 SVS (own level)", cc0)])
        pixels = [{"slide": name, **pixels_identical(tiles)} for name, tiles in slides]
        if args.gpu_decode:
            for row, (_, tiles) in zip(pixels, slides):
                row["GPU-decoded pixel-identical"] = gpu_pixels_identical(tiles, model, args)
        print_table("pixels (stored tiles vs OpenSlide + PIL BOX)", pixels)
        from h0mini.preprocess import Preprocessing

        preprocessing = Preprocessing.from_model(model)
        per_core = []
        for name, tiles in slides:
            rates = reading_per_process(tiles, preprocessing, args.rounds)
            base = rates["openslide read_region"][1]
            per_core += [{"slide": name, "reader": k, "tiles/s (wall)": round(wall, 1), "tiles per CPU-s": round(cpu, 1),
                          "x baseline (CPU)": round(cpu / base, 2), "cores for 5,000 tiles/s": round(5000 / cpu),
                          "cores for 10,000 tiles/s": round(10000 / cpu)}
                         for k, (wall, cpu) in rates.items() if tiles is tiles40 or "DCT" not in k]
        print_table("one process reading + preparing tiles (per core: tiles per CPU-second; interleaved rounds, best)",
                    per_core)
        print_table("DCT-domain 1/2 scaling vs full decode + BOX (40x pyramid)", [dct_difference(tiles40, model, args)])
        if not args.smoke:
            huge = write_huge_slide(Path(folder) / "huge.tif")
            print_table(f"peak RSS, {args.rss_reads} tiles read in one process (bound: "
                        f"{stored_tiles.CACHE_BYTES / 2**20:.0f} MiB decoded tiles)", peak_rss(pyramid, huge, args.rss_reads))
        print(f"load average {os.getloadavg()[0]:.1f} at end")
    return rows


if __name__ == "__main__":
    main()
