"""Benchmark 7: torch fp32 / bf16 against ONNX Runtime fp32 / int8 (static QDQ), tiles/s and cosine to fp32.

    python benchmarks/onnx_runtime.py                                         # this CPU
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/onnx_runtime.py     # as a CPU without native bf16

Every configuration runs ``embed_tiles`` on the same in-memory 224 px H&E tiles (preprocessing,
forward pass, pooling), in interleaved rounds, each keeping its best round. The int8 model is
written by ``export_onnx(quantize="int8")`` (calibrated and gated on other tiles of the example
slide) with random weights: its speed holds for the real weights, its accuracy must be checked on
them with ``h0mini export --quantize int8 --calibration YOUR_TILES``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import h0mini
from common import cosine, machine, print_table, slide_tiles
from h0mini.export import export_onnx
from h0mini.testing import random_model


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu",), help="ONNX Runtime runs on the CPU here")
    parser.add_argument("--tiles", type=int, default=16, help="tiles per timed call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--smoke", action="store_true", help="a 1-block model of H0-mini's width, a few tiles")
    args = parser.parse_args(argv)
    model = random_model("h0_mini", depth=1) if args.smoke else random_model("h0_mini")
    tiles = [t for _, t in slide_tiles()]
    timed_tiles = np.stack(tiles[: 4 if args.smoke else args.tiles])
    calibration = np.stack(tiles[len(tiles) - (12 if args.smoke else 24):])  # other tiles than the timed ones
    rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir, int8_dir = Path(tmp) / "fp32", Path(tmp) / "int8"
        export_onnx(model, fp32_dir, calibration=calibration)
        gate = export_onnx(model, int8_dir, quantize="int8", calibration=calibration).int8
        configs = {
            "torch fp32": (model, "fp32"),
            "torch bf16": (model, "bf16"),
            "ORT fp32": (h0mini.load_model(fp32_dir), "auto"),
            "ORT int8 QDQ": (h0mini.load_model(int8_dir), "auto"),
        }
        rows = []
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            rows += measure(configs, timed_tiles, batch_size, rounds)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print_table(f"embed_tiles tiles/s, {machine()}, ONEDNN_MAX_CPU_ISA={isa}, load {os.getloadavg()[0]:.2f}; "
                f"int8 gate (held-out, random weights): min CLS cos {gate.min_cosine['cls']:.6f}", rows)
    return rows


def measure(configs: dict, tiles: np.ndarray, batch_size: int, rounds: int) -> list:
    """Interleaved rounds: every configuration once per round, each keeping its best time."""

    def run(name):
        model, precision = configs[name]
        return h0mini.embed_tiles(tiles, model, embedding="cls", batch_size=batch_size, precision=precision,
                                  device="cpu", num_workers=0, progress=False)

    outputs = {name: run(name) for name in configs}  # also the warm-up
    best = dict.fromkeys(configs, float("inf"))
    for _ in range(rounds):
        for name in configs:
            start = time.perf_counter()
            run(name)
            best[name] = min(best[name], time.perf_counter() - start)
    reference, fp32_speed = outputs["torch fp32"], len(tiles) / best["torch fp32"]
    return [
        {"batch": batch_size, "runtime": name, "tiles/s": len(tiles) / best[name],
         "vs torch fp32": f"{len(tiles) / best[name] / fp32_speed:.2f}x",
         "min CLS cosine to fp32": float(cosine(outputs[name], reference).min())}
        for name in configs
    ]


if __name__ == "__main__":
    main()
