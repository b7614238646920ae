"""Benchmark 4: fp16/bf16 embeddings against fp32 on real H&E tiles (cosine, max abs difference).

    python benchmarks/precision_parity.py              # CPU: bf16
    python benchmarks/precision_parity.py --device cuda  # fp16 and bf16
"""

from __future__ import annotations

import argparse

import numpy as np

import h0mini
from common import cosine, machine, model_for, print_table, slide_tiles
from h0mini.runtime import resolve_device


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = model_for(args.smoke).to(device)
    tiles = [t for _, t in slide_tiles()][: 4 if args.smoke else args.tiles]
    precisions = ["fp16", "bf16"] if device.type == "cuda" else ["bf16"]
    rows = []
    for output in ("cls+mean", "cls"):
        reference = h0mini.embed_tiles(tiles, model, output=output, device=device, precision="fp32", progress=False)
        for precision in precisions:
            got = h0mini.embed_tiles(tiles, model, output=output, device=device, precision=precision, progress=False)
            similarity = cosine(reference, got)
            rows.append({"output": output, "precision": precision, "tiles": len(tiles), "min cosine": float(similarity.min()),
                         "mean cosine": float(similarity.mean()), "max abs diff": float(np.abs(reference - got).max()),
                         "max abs value": float(np.abs(reference).max())})
    print_table(f"Precision parity against fp32, {machine()}", rows)
    return rows


if __name__ == "__main__":
    main()
