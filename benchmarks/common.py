"""Shared pieces of the benchmark scripts: models with trained-like weights, tiles on disk, timing, tables.

The real H0-mini weights are gated and cannot be used here; speed does not depend on the
weight values, and parity is measured on random weights whose LayerScale gammas are given
trained-like magnitudes (0.05-0.5) so that every block does real work.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import h0mini  # noqa: E402,F401
from helpers import make_model, slide_tiles  # noqa: E402

GFLOPS_PER_TILE = {"h0_mini": 44.6, "h0mini_test": 0.05}


def model_for(smoke: bool) -> torch.nn.Module:
    return make_model("h0mini_test" if smoke else "h0_mini")


def arch_of(model: torch.nn.Module) -> str:
    return "h0mini_test" if model.embed_dim == 48 else "h0_mini"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()} CPU, {cpus} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` runs after ``warmup`` runs (best-of: these machines are shared and noisy)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_runner(device: torch.device, dtype: torch.dtype, n: int = 4096) -> Callable[[], torch.Tensor]:
    """One dense n x n matmul (2 n^3 FLOP): the ceiling model FLOP utilisation is compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b



def write_tiles(folder: Path, count: int, size: int = 224, fmt: str = "png") -> List[Path]:
    """``count`` real H&E tiles from the example slide (cycled), written as ``fmt`` files of ``size`` px."""
    folder.mkdir(parents=True, exist_ok=True)
    tiles = [t for _, t in slide_tiles()]
    paths = []
    for i in range(count):
        image = Image.fromarray(tiles[i % len(tiles)])
        if size != 224:
            image = image.resize((size, size), Image.BICUBIC)
        path = folder / f"tile_{i:06d}.{fmt}"
        image.save(path, quality=90) if fmt == "jpg" else image.save(path)
        paths.append(path)
    return paths


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def print_table(title: str, rows: Sequence[Dict[str, object]]) -> None:
    print(f"\n{title}\n")
    if not rows:
        return
    keys = list(rows[0].keys())
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("| " + " | ".join(k.ljust(w) for k, w in zip(keys, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if 0.999 <= abs(value) < 1:
            return f"{value:.6f}"  # cosines near 1: four decimals would round them to 1.0000
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return "" if value is None else str(value)
