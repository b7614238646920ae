"""Embed the example H&E tiles with H0-mini and look at what comes back.

    python examples/quickstart.py                      # bioptimus/H0-mini (gated: HF_TOKEN)
    H0MINI_WEIGHTS=./H0-mini python examples/quickstart.py   # a local copy, offline
"""

from pathlib import Path

import numpy as np

import h0mini

TILES = Path(__file__).parent / "tiles"

model = h0mini.load_model()  # H0MINI_WEIGHTS, or the Hub repo
print(f"model: {model.h0mini_weights.arch} from {model.h0mini_weights.source} "
      f"(revision {model.h0mini_weights.revision or 'local'})")

features = h0mini.embed_tiles(TILES, model)  # CLS + mean of patch tokens, one row per tile
print(f"embeddings: {features.shape} {features.dtype}")

tokens = h0mini.embed_tiles(TILES, model, embedding="all")
print({name: array.shape for name, array in tokens.items()})

unit = features / np.linalg.norm(features, axis=1, keepdims=True)
similarity = unit @ unit.T
names = sorted(p.stem for p in TILES.glob("*.png"))
np.fill_diagonal(similarity, -1)
for name, row in zip(names, similarity):
    print(f"{name}: most similar to {names[int(row.argmax())]} (cosine {row.max():.3f})")
