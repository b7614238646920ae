"""How long do the PLISM metrics take at the real benchmark's scale (91 slides x 8,139 tiles x 768-d)?

Times the two kernels of ``h0mini.eval.plism`` in both arithmetics on related random features
(each slide is the same tiles plus noise) at a few tile counts: the once-per-slide preparation
(float16 cast and norms, within-slide neighbours; 91 calls at full scale) and the per-pair
metrics (4,095 calls). The default float16 arithmetic is plism-benchmark's own, reproduced bit for
bit; ``--numpy`` also times plism-benchmark's plain numpy float16 computation of one pair for
comparison. Checks the cost model against a complete ``evaluate_slides`` run on a few slides and
extrapolates to the full benchmark (both kernels scale about as n^2 d). ``--full`` runs the real size.

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
from h0mini.eval.plism import float16, float32

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


def related_slides(n: int, dim: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim)).astype(np.float32)
    return [base + rng.normal(size=base.shape).astype(np.float32) for _ in range(count)]


def time_kernels(n: int, dim: int, device: torch.device, chunk_size: int, repeats: int, precision: str):
    a, b = related_slides(n, dim, 2, n)
    kmax = max(plism.TOP_K)
    if precision == "float16":
        prepare = lambda x: float16.prepare_half(x, device=device)  # noqa: E731
        top, pair = float16.within_slide_top, lambda p, q: float16.pair_metrics_half(p, q, plism.TOP_K, chunk_size)  # noqa: E731
    else:
        prepare = lambda x: float32.prepare_features(x, device=device)  # noqa: E731
        top = float32.within_slide_top
        pair = lambda p, q: float32.metrics_from_ranks(*float32.pair_ranks(p, q, chunk_size), plism.TOP_K)  # noqa: E731
    first, second = prepare(a), prepare(b)
    top(first, kmax, chunk_size)
    top(second, kmax, chunk_size)

    def per_slide():
        top(prepare(a), kmax, chunk_size)

    with torch.inference_mode():
        t_self = _best_of(per_slide, repeats, device)
        t_pair = _best_of(lambda: pair(first, second), repeats, device)
    return t_self, t_pair


def numpy_pair_seconds(n: int, dim: int) -> float:
    """plism-benchmark's own computation of one pair: the full 2n x 2n matrix in numpy float16."""
    a, b = related_slides(n, dim, 2, n)
    start = time.perf_counter()
    pooled = np.concatenate([a, b]).astype(np.float16)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    cosines = (pooled @ pooled.T) / (norms * norms.T)
    np.argpartition(-cosines, range(1, 11), axis=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tiles", default="1024,2048,4096", help="comma-separated tile counts to time")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check-slides", type=int, default=6, help="slides of the end-to-end check run")
    parser.add_argument("--full", action="store_true", help="also run the complete 91 x 8,139 benchmark")
    parser.add_argument("--precision", default="float16", choices=("float16", "float32"))
    parser.add_argument("--numpy", type=int, default=0, metavar="N", help="also time numpy float16 on one pair of N tiles")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(s) for s in args.tiles.split(",")]
    flops = lambda n: 2.0 * n * n * args.dim  # noqa: E731  (one n x n x d product)

    print(f"device {device}, torch threads {torch.get_num_threads()}, dim {args.dim}, chunk {args.chunk_size}, "
          f"precision {args.precision}")  # fmt: skip
    if args.numpy:
        print(f"numpy float16 (plism-benchmark's CPU path), one pair of {args.numpy} tiles: "
              f"{numpy_pair_seconds(args.numpy, args.dim):.2f} s")  # fmt: skip
    print(f"{'tiles':>6} {'self top-k (s)':>15} {'pair (s)':>9} {'pair GFLOP/s':>13}")
    timings = {}
    for n in sizes:
        t_self, t_pair = time_kernels(n, args.dim, device, args.chunk_size, args.repeats, args.precision)
        timings[n] = (t_self, t_pair)
        print(f"{n:>6} {t_self:>15.3f} {t_pair:>9.3f} {flops(n) / t_pair / 1e9:>13.1f}")

    # Cost model t = c * n^2 from the largest measured size.
    n_ref = max(sizes)
    c_self, c_pair = (t / n_ref**2 for t in timings[n_ref])

    # End-to-end check: evaluate_slides on a few slides at the largest size.
    slides = args.check_slides
    names = [f"{plism.PLISM_STAININGS[i % 13]}_{plism.PLISM_SCANNERS[i // 13]}" for i in range(slides)]
    feats = dict(zip(names, related_slides(n_ref, args.dim, slides, 0)))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    plism.evaluate_slides(feats, device=device, chunk_size=args.chunk_size, precision=args.precision, progress=False)
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
        names = [f"{plism.PLISM_STAININGS[i % 13]}_{plism.PLISM_SCANNERS[i // 13]}" for i in range(FULL_SLIDES)]
        feats = dict(zip(names, related_slides(FULL_TILES, args.dim, FULL_SLIDES, 1)))
        start = time.perf_counter()
        pairs_table = plism.evaluate_slides(
            feats, device=device, chunk_size=args.chunk_size, precision=args.precision, progress=True
        )
        _sync(device)
        print(f"\nfull benchmark: {len(pairs_table)} pairs in {time.perf_counter() - start:.1f} s; "
              f"leaderboard score on random features {plism.leaderboard_score(pairs_table):.3f}")  # fmt: skip
        if device.type == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
