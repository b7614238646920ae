"""Fault injection: a fuzzed tile corpus, and `h0mini embed` killed at random moments then resumed.

Opt-in and bounded (minutes). Two parts, each a table row:

* **fuzz**: ``--fuzz N`` files made from an example tile (truncated, bytes flipped, headers that
  lie about the size, absurd aspect ratios, 32-bit float TIFF, empty, not an image) embedded with
  ``on_error="skip"``: every bad file must be skipped *by name*, none may crash the run, and the
  peak resident memory of the run is reported (a 241-byte 1x40000 PNG once took 9.1 GB).
* **kill/resume**: ``--kills N`` runs of ``h0mini embed`` (a tiny local checkpoint) sent SIGKILL,
  SIGINT or SIGTERM after a random delay, each followed by a resume; the final output must equal
  an uninterrupted run's (max abs diff), with no temporary file left and exit 130 on SIGINT.

    python benchmarks/fault_injection.py --fuzz 300 --kills 50
    python benchmarks/fault_injection.py --smoke
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from common import machine, print_table
from h0mini.checkpoint_io import write_hub_checkpoint
from h0mini.job import embed_to_file
from h0mini.embed import TileEmbedder
from h0mini.testing import random_model
from h0mini.writers import read_embeddings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "tiles").glob("*.png"))


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_fuzz_corpus(folder: Path, count: int, seed: int = 0) -> Dict[str, str]:
    """``count`` hostile files in ``folder``; returns name -> kind."""
    rng = random.Random(seed)
    good = [p.read_bytes() for p in EXAMPLES]
    kinds: Dict[str, str] = {}
    makers = {
        "truncated": lambda data: data[: rng.randrange(1, len(data))],
        "flipped": lambda data: bytes(b ^ 0xFF if rng.random() < 0.01 else b for b in data),
        "empty": lambda data: b"",
        "text": lambda data: b"not an image at all\n" * rng.randrange(1, 50),
        "lying header": lambda data: _png_claiming(*rng.choice([(1, 100_000_000), (100_000_000, 1), (100_000, 100_000)])),
        "strip": None,  # written by Pillow below
        "float tiff": None,
    }
    for i in range(count):
        kind = rng.choice(sorted(makers))
        suffix = ".tif" if kind == "float tiff" else ".png"
        path = folder / f"fuzz_{i:04d}_{kind.replace(' ', '_')}{suffix}"
        if kind == "strip":
            Image.new("RGB", rng.choice([(1, 40_000), (40_000, 1), (2, 20_000)])).save(path)
        elif kind == "float tiff":
            Image.fromarray(np.random.default_rng(i).random((64, 64), dtype=np.float32), "F").save(path)
        else:
            path.write_bytes(makers[kind](rng.choice(good)))
        kinds[str(path)] = kind
    return kinds


def fuzz(count: int, workdir: Path) -> Dict[str, object]:
    folder = workdir / "fuzz"
    folder.mkdir()
    kinds = write_fuzz_corpus(folder, count)
    for example in EXAMPLES:
        shutil.copy(example, folder / example.name)
    embedder = TileEmbedder(random_model("h0mini_test"), embedding="cls", device="cpu", num_workers=0, batch_size=8)
    started = time.perf_counter()
    result = embed_to_file([str(folder)], workdir / "fuzz.h5", embedder, on_error="skip", progress=False)
    seconds = time.perf_counter() - started
    skipped = {item["path"] for item in result.skipped}
    # "flipped" files may still decode (a flipped byte in pixel data): embedded is fine, crashing is not.
    must_skip = {p for p, k in kinds.items() if k != "flipped"}
    return {
        "part": "fuzz",
        "files": count + len(EXAMPLES),
        "embedded": result.embedded,
        "skipped by name": len(skipped),
        "bad files not skipped": len(must_skip - skipped),
        "seconds": round(seconds, 1),
        "peak RSS MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def kill_resume(kills: int, workdir: Path, tiles_count: int, seed: int = 0) -> Dict[str, object]:
    rng = random.Random(seed)
    checkpoint = write_hub_checkpoint(workdir / "ckpt", random_model("h0mini_test"), "h0mini_test")
    tiles = workdir / "tiles"
    tiles.mkdir()
    for i in range(tiles_count):
        shutil.copy(EXAMPLES[i % len(EXAMPLES)], tiles / f"t{i:05d}.png")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "h0mini", "embed", str(tiles), "--weights", str(checkpoint), "--num-workers", "0",
            "--save-every", "8", "--batch-size", "8", "--output-mode", "cls", "-q"]
    reference = workdir / "reference.h5"
    started = time.perf_counter()
    subprocess.run(base + ["-o", str(reference)], env=env, check=True, capture_output=True)
    full_run = time.perf_counter() - started
    expected = read_embeddings(reference).arrays["features"]
    worst, bad_exit, corrupt, leftovers = 0.0, 0, 0, 0
    for k in range(kills):
        out = workdir / f"out{k}.h5"
        sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
        process = subprocess.Popen(base + ["-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        delay = rng.uniform(0.0, full_run * 1.05)
        time.sleep(delay)
        process.send_signal(sig)
        _, err = process.communicate()
        if sig == signal.SIGINT and (process.returncode, err.strip()) not in ((0, b""), (130, b"interrupted")):
            bad_exit += 1
            print(f"SIGINT after {delay:.3f} s: exit {process.returncode}, stderr {err[-300:]!r}", file=sys.stderr)
        if out.exists():  # whatever is under the final name must be complete
            try:
                read_embeddings(out)
            except Exception:
                corrupt += 1
        subprocess.run(base + ["-o", str(out)], env=env, check=True, capture_output=True)
        got = read_embeddings(out).arrays["features"]
        worst = max(worst, float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf"))
        leftovers += sum(1 for p in workdir.iterdir() if p.name.startswith(f".out{k}.h5.") and p.name.endswith(".tmp"))
    return {
        "part": "kill/resume",
        "runs killed": kills,
        "tiles": tiles_count,
        "max abs diff": worst,
        "corrupt outputs": corrupt,
        "temp files left": leftovers,
        "bad SIGINT exits": bad_exit,
        "seconds per full run": round(full_run, 1),
    }


def main(argv: List[str] = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=300, help="fuzzed files (default 300)")
    parser.add_argument("--kills", type=int, default=50, help="killed runs (default 50)")
    parser.add_argument("--tiles", type=int, default=64, help="tiles per kill/resume run (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the corpus and the kill times")
    parser.add_argument("--smoke", action="store_true", help="a few files and kills, for the test suite")
    parser.add_argument("--device", default="cpu", help="ignored: the tiny model runs on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.fuzz, args.kills, args.tiles = 14, 2, 16
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = [fuzz(args.fuzz, workdir), kill_resume(args.kills, workdir, args.tiles, args.seed)]
    print_table(f"fault injection ({machine()})", rows[:1])
    print_table("kill/resume", rows[1:])
    return rows


if __name__ == "__main__":
    main()
