"""The values the parser offers, readable without importing torch (parse first, import late).

Each mirrors a library constant; ``tests/test_vocabulary.py`` checks that they agree.
"""

from __future__ import annotations

EMBEDDINGS = ("cls+mean", "cls", "mean", "patch_tokens", "all")  # h0mini.embed.OUTPUTS
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # h0mini.runtime.resolve_precision
JPEG_DECODERS = ("cpu", "device")  # h0mini.jpeg.JPEG_DECODERS
FORMATS = (".h5", ".hdf5", ".npy", ".pt", ".parquet")  # h0mini.writers.FORMATS
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 8}  # h0mini.embed.DEFAULT_BATCH_SIZE
READERS = ("auto", "openslide", "tiffslide")  # h0mini.wsi.reader.READERS
TARGET_MPP = 0.5  # h0mini.wsi.grid.TARGET_MPP
MIN_TISSUE = 0.25  # h0mini.wsi.grid.MIN_TISSUE
CLAIM_TIMEOUT = 600.0  # h0mini.wsi.claims.CLAIM_TIMEOUT (seconds)
