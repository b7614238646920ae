"""How long do the PLISM metrics take at the real benchmark's scale (91 slides x 8,139 tiles x 768-d)?

Times the two kernels of ``h0mini.eval.plism`` on random features at a few tile counts:
the once-per-slide within-slide top-k (91 calls at full scale) and the per-pair ranking (4,095
calls), checks the cost model against a complete ``evaluate_slides`` run on a few slides, and
extrapolates to the full benchmark (both kernels scale as n^2 d). ``--full`` runs the real size.

    python benchmarks/plism_scale.py                      # CPU, reduced sizes + extrapolation
    python benchmarks/plism_scale.py --device cuda --full # the whole benchmark on a GPU
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np
import torch

from h0mini.eval import plism

FULL_SLIDES, FULL_TILES, FULL_PAIRS = 91, plism.PLISM_NUM_TILES, 4095


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, repeats: int, device: torch.device) -> float:
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def time_kernels(n: int, dim: int, device: torch.device, chunk_size: int, repeats: int):
    rng = np.random.default_rng(n)
    base = rng.normal(size=(n, dim)).astype(np.float32)
    a = plism.prepare_features(base + rng.normal(size=base.shape).astype(np.float32), name="a", device=device)
    b = plism.prepare_features(base + rng.normal(size=base.shape).astype(np.float32), name="b", device=device)
    kmax = max(plism.TOP_K)
    top_a = plism._self_top(a, kmax, chunk_size)
    top_b = plism._self_top(b, kmax, chunk_size)
    with torch.inference_mode():
        t_self = _best_of(lambda: plism._self_top(a, kmax, chunk_size), repeats, device)
        t_pair = _best_of(lambda: plism._pair_ranks(a, b, top_a, top_b, chunk_size), repeats, device)
    return t_self, t_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tiles", default="1024,2048,4096", help="comma-separated tile counts to time")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check-slides", type=int, default=6, help="slides of the end-to-end check run")
    parser.add_argument("--full", action="store_true", help="also run the complete 91 x 8,139 benchmark")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(s) for s in args.tiles.split(",")]
    flops = lambda n: 2.0 * n * n * args.dim  # noqa: E731  (one n x n x d product)

    print(f"device {device}, torch threads {torch.get_num_threads()}, dim {args.dim}, chunk {args.chunk_size}")
    print(f"{'tiles':>6} {'self top-k (s)':>15} {'pair (s)':>9} {'pair GFLOP/s':>13}")
    timings = {}
    for n in sizes:
        t_self, t_pair = time_kernels(n, args.dim, device, args.chunk_size, args.repeats)
        timings[n] = (t_self, t_pair)
        print(f"{n:>6} {t_self:>15.3f} {t_pair:>9.3f} {flops(n) / t_pair / 1e9:>13.1f}")

    # Cost model t = c * n^2 from the largest measured size.
    n_ref = max(sizes)
    c_self, c_pair = (t / n_ref**2 for t in timings[n_ref])

    # End-to-end check: evaluate_slides on a few slides at the largest size.
    slides = args.check_slides
    names = [f"{plism.PLISM_STAININGS[i % 13]}_{plism.PLISM_SCANNERS[i // 13]}" for i in range(slides)]
    rng = np.random.default_rng(0)
    feats = {name: rng.normal(size=(n_ref, args.dim)).astype(np.float16) for name in names}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    plism.evaluate_slides(feats, device=device, chunk_size=args.chunk_size, progress=False)
    _sync(device)
    measured = time.perf_counter() - start
    pairs = slides * (slides - 1) // 2
    predicted = slides * c_self * n_ref**2 + pairs * c_pair * n_ref**2
    print(f"\nevaluate_slides, {slides} slides x {n_ref} tiles ({pairs} pairs): {measured:.2f} s measured, "
          f"{predicted:.2f} s predicted by the kernel timings")  # fmt: skip
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"peak RSS growth during the run: {rss_growth:.0f} MiB")

    full = FULL_SLIDES * c_self * FULL_TILES**2 + FULL_PAIRS * c_pair * FULL_TILES**2
    print(f"\nextrapolated full benchmark ({FULL_SLIDES} slides x {FULL_TILES} tiles x {args.dim}, {FULL_PAIRS} pairs): "
          f"{full:.0f} s = {full / 60:.1f} min on {device}")  # fmt: skip
    slide_bytes = FULL_TILES * args.dim * 4
    print(f"memory: {slide_bytes / 2**20:.0f} MiB per slide on the device (all 91: {FULL_SLIDES * slide_bytes / 2**30:.2f} GiB, "
          f"or bounded with max_slides_in_memory), plus ~{3 * args.chunk_size * FULL_TILES * 4 / 2**20:.0f} MiB of similarity blocks")  # fmt: skip

    if args.full:
        feats = {}
        for i in range(FULL_SLIDES):
            name = f"{plism.PLISM_STAININGS[i % 13]}_{plism.PLISM_SCANNERS[i // 13]}"
            feats[name] = rng.normal(size=(FULL_TILES, args.dim)).astype(np.float16)
        start = time.perf_counter()
        pairs_table = plism.evaluate_slides(feats, device=device, chunk_size=args.chunk_size, progress=True)
        _sync(device)
        print(f"\nfull benchmark: {len(pairs_table)} pairs in {time.perf_counter() - start:.1f} s; "
              f"leaderboard score on random features {plism.leaderboard_score(pairs_table):.3f}")  # fmt: skip
        if device.type == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
