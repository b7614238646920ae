"""`h0mini embed`: readable outputs with provenance, resume after interruption, clear failures."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import h0mini
from h0mini.cli import main
from h0mini.embed import TileEmbedder
from h0mini.job import embed_to_file
from h0mini.writers import read_embeddings
from helpers import EXAMPLE_TILES, slide_tiles, write_checkpoint
from PIL import Image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder)
    return folder


@pytest.fixture
def tiles(tmp_path):
    folder = tmp_path / "tiles"
    shutil.copytree(EXAMPLE_TILES[0].parent, folder)
    return folder


def embed(*args):
    return main(["embed", *map(str, args)])


def expected_features(checkpoint, paths, output="cls+mean"):
    return h0mini.embed_tiles([str(p) for p in paths], h0mini.load_model(checkpoint), embedding=output, precision="fp32")


def test_h5_holds_features_names_coords_and_provenance(checkpoint, tiles, tmp_path, capsys):
    out = tmp_path / "features.h5"
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--precision", "fp32") == 0
    assert "7 tiles (7 embedded" in capsys.readouterr().out
    paths = sorted(tiles.glob("*.png"))
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["features"][()], expected_features(checkpoint, paths), atol=1e-5)
        assert [n.decode() for n in f["tile_names"][()]] == [str(p) for p in paths]
        assert f["coords"][0].tolist() == [896, 448]  # parsed from cmu1_x0896_y0448.png
        provenance = json.loads(f.attrs["h0mini_provenance"])
        assert f.attrs["weights_sha256"] == provenance["weights_sha256"] == h0mini.load_model(checkpoint).h0mini_weights.sha256
    assert provenance["output"] == "cls+mean" and provenance["precision"] == "fp32"
    assert provenance["preprocessing"]["input_size"] == 224 and provenance["arch"] == "h0mini_test"
    for key in ("h0mini_version", "timm_version", "torch_version", "revision", "weights"):
        assert key in provenance
    assert not out.with_name(out.name + ".parts").exists()


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".parquet"])
def test_other_formats_hold_the_same_numbers(checkpoint, tiles, tmp_path, suffix):
    out = tmp_path / f"features{suffix}"
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--precision", "fp32", "--output-mode", "cls") == 0
    expected = expected_features(checkpoint, sorted(tiles.glob("*.png")), output="cls")
    if suffix == ".npy":
        loaded = np.load(out)
        meta = json.loads(out.with_name(out.name + ".json").read_text())
        assert len(meta["tile_names"]) == 7 and meta["provenance"]["output"] == "cls"
    elif suffix == ".pt":
        payload = torch.load(out, weights_only=True)
        loaded = payload["features"].numpy()
        assert payload["provenance"]["output"] == "cls" and payload["coords"].shape == (7, 2)
    else:
        frame = pd.read_parquet(out)
        loaded = np.stack(frame["features"].to_numpy())
        assert list(frame.columns) == ["tile_name", "x", "y", "features"]
    np.testing.assert_allclose(loaded, expected, atol=1e-5)
    assert read_embeddings(out).provenance["output"] == "cls"


def test_all_outputs_go_to_h5_and_not_to_npy(checkpoint, tiles, tmp_path):
    assert embed(tiles, "-o", tmp_path / "all.h5", "--weights", checkpoint, "--embedding", "all") == 0
    with h5py.File(tmp_path / "all.h5") as f:
        assert f["cls"].shape == (7, 48) and f["registers"].shape == (7, 4, 48) and f["patch_tokens"].shape == (7, 256, 48)
    assert embed(tiles, "-o", tmp_path / "all.npy", "--weights", checkpoint, "--embedding", "all") == 2


def test_an_interrupted_run_resumes_with_only_the_missing_tiles(checkpoint, tiles, tmp_path, monkeypatch):
    out = tmp_path / "features.h5"
    embedder = TileEmbedder(h0mini.load_model(checkpoint), batch_size=2, precision="fp32")
    real = TileEmbedder.iter_batches

    def interrupted(self, source, on_error="raise"):
        for n, batch in enumerate(real(self, source, on_error=on_error)):
            if n == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(TileEmbedder, "iter_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed_to_file([tiles], out, embedder, part_size=2)
    assert not out.exists() and len(list(out.with_name(out.name + ".parts").glob("part-*.npz"))) == 2
    monkeypatch.setattr(TileEmbedder, "iter_batches", real)

    result = embed_to_file([tiles], out, embedder, overwrite=True)  # same settings: overwrite keeps the batches
    assert (result.reused, result.embedded) == (4, 3)
    np.testing.assert_allclose(
        read_embeddings(out).arrays["features"], expected_features(checkpoint, sorted(tiles.glob("*.png"))), atol=1e-5
    )


def test_new_tiles_extend_a_finished_output(checkpoint, tiles, tmp_path, capsys):
    out = tmp_path / "features.h5"
    first = sorted(tiles.glob("*.png"))[:4]
    assert embed(*first, "-o", out, "--weights", checkpoint, "--precision", "fp32") == 0
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--precision", "fp32") == 0
    assert "7 tiles (3 embedded, 4 reused" in capsys.readouterr().out.splitlines()[-1]
    # Other settings never mix with the old numbers, and never replace them unasked.
    capsys.readouterr()
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--precision", "bf16") == 1
    error = capsys.readouterr().err
    assert "precision: saved 'fp32', now 'bf16'" in error and "add --overwrite" in error
    assert read_embeddings(out).provenance["precision"] == "fp32"
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--precision", "bf16", "--overwrite") == 0
    assert "7 tiles (7 embedded" in capsys.readouterr().out
    # --overwrite replaces work made otherwise, not work made with these settings
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--precision", "bf16", "--overwrite") == 0
    assert "7 tiles, already done" in capsys.readouterr().out


def test_a_killed_process_leaves_no_output_that_looks_complete(checkpoint, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for (x, y), tile in slide_tiles()[:40]:
        Image.fromarray(tile).save(folder / f"slide_x{x}_y{y}.png")
    out = tmp_path / "features.h5"
    command = [sys.executable, "-m", "h0mini", "embed", str(folder), "-o", str(out), "--weights", str(checkpoint),
               "--batch-size", "2", "--save-every", "2", "--num-workers", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + 120
    while not list(parts.glob("part-*.npz")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    killed_midway = process.poll() is None  # still running when the first part was saved
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert killed_midway and list(parts.glob("part-*.npz")), "the run ended before it could be killed halfway"
    assert not out.exists()  # half done: no output that looks complete
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "40 tiles" in finished.stdout and "reused" in finished.stdout
    assert len(read_embeddings(out)) == 40


def test_bad_tiles_stop_with_one_line_or_are_skipped_and_reported(checkpoint, tiles, tmp_path, capsys):
    broken = tiles / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "features.h5"
    assert embed(tiles, "-o", out, "--weights", checkpoint) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.png" in err and "not an image" in err and "tile 0" in err

    assert embed(tiles, "-o", out, "--weights", checkpoint, "--on-error", "skip") == 0
    captured = capsys.readouterr()
    assert "skipped tile 0" in captured.err and "1 skipped" in captured.out
    saved = read_embeddings(out)
    assert len(saved) == 7 and saved.skipped[0]["path"] == str(broken)


def test_unreachable_hub_ends_with_the_offline_message(tiles, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert embed(tiles, "-o", tmp_path / "f.h5") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The weights of 'bioptimus/H0-mini'") and "h0mini download" in err


# -- edge cases found in review ---------------------------------------------------------------------


def test_an_npy_that_does_not_match_its_sidecar_is_never_read_as_complete(checkpoint, tiles, tmp_path, capsys):
    out = tmp_path / "features.npy"
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--output-mode", "cls") == 0
    np.save(out, np.zeros((7, 48), np.float32))  # as if killed between the two renames
    with pytest.raises(ValueError, match="does not describe"):
        read_embeddings(out)
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--output-mode", "cls") == 0
    assert "7 embedded" in capsys.readouterr().out
    assert np.abs(read_embeddings(out).arrays["features"]).max() > 0


def test_an_empty_parquet_reads_back(checkpoint, tmp_path):
    from h0mini.writers import Embeddings, write_embeddings

    out = tmp_path / "empty.parquet"
    write_embeddings(out, Embeddings({"features": np.zeros((0, 96), np.float32)}, [], None, {"output": "cls+mean"}))
    assert read_embeddings(out).arrays["features"].shape == (0, 96)


def test_a_bad_tile_found_on_resume_is_named_by_its_input_position(checkpoint, tiles, tmp_path, capsys):
    out = tmp_path / "features.h5"
    paths = sorted(tiles.glob("*.png"))
    assert embed(*paths[:3], "-o", out, "--weights", checkpoint) == 0
    paths[4].write_bytes(b"broken")
    assert embed(*paths, "-o", out, "--weights", checkpoint) == 1
    assert f"tile 4 '{paths[4]}'" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--input-size", "100"], ["--device", "foo"], ["--batch-size", "0"],
                                    ["--num-workers", "-1"], ["--input-size", "big"]])
def test_bad_options_are_usage_errors(checkpoint, tiles, tmp_path, option):
    assert embed(tiles, "-o", tmp_path / "f.h5", "--weights", checkpoint, *option) == 2


def test_an_unwritable_output_is_a_one_line_error(checkpoint, tiles, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert embed(tiles, "-o", blocker / "f.h5", "--weights", checkpoint) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
