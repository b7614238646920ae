"""Whole slides: µm/px tiling, tissue, pixels and embeddings identical to the tile path, resume, shards, errors."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import h0mini
from h0mini.cli import main
from h0mini.errors import OutputNotWritableError, SlideError
from h0mini.wsi import open_slide, plan_tiling, resolve_shard, tile_slide
from h0mini.wsi.shard import Shard
from h0mini.writers import read_embeddings
from helpers import EXAMPLE_TILES, SLIDE, write_checkpoint

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("scipy")

READERS = ["openslide"] + (["tiffslide"] if __import__("importlib").util.find_spec("tiffslide") else [])
EXAMPLE_COORDS = [tuple(int(part[1:]) for part in p.stem.split("_")[1:]) for p in EXAMPLE_TILES]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return h0mini.load_model(checkpoint)


def slide_pixels(width: int = 1344, height: int = 1344) -> np.ndarray:
    """Real H&E: the top-left of the tissue of the CC0 slide, as a level-0 array."""
    image = Image.open(SLIDE)
    image.seek(0)
    return np.asarray(image.convert("RGB"))[224 : 224 + height, 672 : 672 + width].copy()


def write_pyramid(path: Path, level0: np.ndarray, mpp, downsamples=(1,)) -> Path:
    """A tiled, zlib-compressed pyramidal TIFF that OpenSlide reads as levels (one page per level)."""
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate(downsamples):
            image = Image.fromarray(level0)
            if factor > 1:
                image = image.resize((level0.shape[1] // factor, level0.shape[0] // factor), Image.Resampling.BOX)
            options = {} if mpp is None else {
                "resolution": (1e4 / (mpp * factor), 1e4 / (mpp * factor)), "resolutionunit": "CENTIMETER"}
            tif.write(np.asarray(image), tile=(256, 256), compression="zlib", photometric="rgb",
                      subfiletype=1 if i else 0, **options)
    return path


# -- the CC0 slide -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_cc0_slide_tiles_equal_the_example_files_and_are_kept(reader):
    tiles = tile_slide(SLIDE, reader=reader)
    assert tiles.plan.level0_mpp == pytest.approx(0.499) and tiles.plan.mpp_source == "metadata"
    # 0.499 is within 5% of 0.5: level 0 is read as is, 224 px, no resize.
    assert (tiles.plan.read_level, tiles.plan.read_size, tiles.plan.patch_size_level0) == (0, 224, 224)
    coords = [tuple(c) for c in tiles.coords.tolist()]
    for (x, y), path in zip(EXAMPLE_COORDS, EXAMPLE_TILES):
        assert (x, y) in coords, f"default tissue settings dropped {path.name}"
        region = tiles[coords.index((x, y))]
        assert region.name == f"CMU-1-Small-Region_x{x}_y{y}"
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(region.load()), expected)  # pixel for pixel


def test_cc0_slide_embeddings_equal_embed_tiles_on_the_files(model):
    result = h0mini.embed_slide(SLIDE, model, precision="fp32")
    coords = [tuple(c) for c in result.coords.tolist()]
    rows = [coords.index(c) for c in EXAMPLE_COORDS]
    expected = h0mini.embed_tiles([str(p) for p in EXAMPLE_TILES], model, precision="fp32")
    # Same pixels and preprocessing; only the batch neighbours differ, which changes fp32 matmul
    # blocking at most at the last bits: 1e-5 on values of order 1.
    np.testing.assert_allclose(result.features[rows], expected, atol=1e-5, rtol=0)
    assert result.features.shape == (len(result.coords), 2 * model.num_features)
    assert result.coords.dtype == np.int64
    # Tissue detection keeps the tissue and drops the glass: about 59 of the 117 whole tiles.
    assert 40 <= len(result) <= 75


def test_tiles_from_workers_equal_tiles_from_a_thread_and_from_an_open_handle(model):
    tiles = tile_slide(SLIDE)
    in_workers = h0mini.embed_tiles(tiles, model, num_workers=1, precision="fp32")
    in_thread = h0mini.embed_tiles(tiles, model, num_workers=0, precision="fp32")
    np.testing.assert_array_equal(in_workers, in_thread)
    handle = openslide.OpenSlide(str(SLIDE))  # an object with OpenSlide's API: read in this process only
    from_handle = h0mini.embed_slide(handle, model, precision="fp32", num_workers=2)
    np.testing.assert_array_equal(from_handle.features, in_thread)
    from h0mini.tiles import read_input

    embedder = h0mini.TileEmbedder(model, num_workers=2)
    assert embedder._workers(read_input(tile_slide(handle))) == 0  # never forked into, never pickled
    assert embedder._workers(read_input(tiles)) == 2


def test_slide_tiles_travel_to_spawned_processes_without_a_handle():
    import multiprocessing
    import pickle

    tiles = tile_slide(SLIDE, tissue=None)
    region = tiles[20]
    assert b"OpenSlide" not in pickle.dumps(region)  # a path and a reader name, never a handle
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pixels = pool.apply(np.asarray, (region.load(),))
        remote = pool.apply(_load, (region,))
    np.testing.assert_array_equal(remote, pixels)


def _load(region):
    return np.asarray(region.load())


def test_the_output_h5_has_what_trident_and_clam_readers_expect(model, tmp_path):
    out = tmp_path / "slide.h5"
    result = h0mini.embed_slide(SLIDE, model, output_path=out, qc_path=tmp_path / "qc.png", slide_pool="mean")
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (len(result), 2 * model.num_features)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (len(result), 2)
        attrs = dict(f["coords"].attrs)
        assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 224 and attrs["overlap"] == 0
        assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == 20
        assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
        assert attrs["level0_mpp"] == pytest.approx(0.499) and attrs["target_mpp"] == 0.5
        # The slide vector is the float64 mean of the rows (summed part by part), rounded once to float32.
        np.testing.assert_allclose(f["slide_features"][()], f["features"][()].astype(np.float64).mean(0), rtol=1e-6)
    picture = Image.open(tmp_path / "qc.png")
    assert picture.mode == "RGB" and max(picture.size) > 500
    pixels = np.asarray(picture)
    assert (np.all(pixels == (20, 60, 255), axis=-1)).sum() > 1000  # the tile grid is drawn
    assert (np.all(pixels == (0, 200, 70), axis=-1)).sum() > 100  # and the tissue outline


# -- pyramids ------------------------------------------------------------------------------------------


def test_a_40x_pyramid_reads_its_20x_level_as_is(tmp_path):
    pixels = slide_pixels()
    path = write_pyramid(tmp_path / "x40.tif", pixels, mpp=0.25, downsamples=(1, 2, 4))
    tiles = tile_slide(path, tissue=None)
    plan = tiles.plan
    assert plan.level0_mpp == pytest.approx(0.25)
    assert (plan.read_level, plan.read_size, plan.patch_size_level0) == (1, 224, 448)
    assert len(tiles) == 9 and tiles.coords.tolist()[:2] == [[0, 0], [448, 0]]
    level1 = np.asarray(Image.fromarray(pixels).resize((672, 672), Image.Resampling.BOX))
    np.testing.assert_array_equal(np.asarray(tiles[1].load()), level1[0:224, 224:448])


def test_an_aperio_like_pyramid_reads_a_finer_level_and_downscales(tmp_path):
    pixels = slide_pixels()
    path = write_pyramid(tmp_path / "aperio.tif", pixels, mpp=0.25, downsamples=(1, 4, 16))
    tiles = tile_slide(path, tissue=None)
    plan = tiles.plan
    # Levels at 0.25, 1.0 and 4.0 µm/px: none within 5% of 0.5; the nearest finer one is level 0.
    assert (plan.read_level, plan.read_size, plan.patch_size_level0) == (0, 448, 448) and plan.resized
    expected = Image.fromarray(pixels[448:896, 0:448]).resize((224, 224), Image.Resampling.BOX)
    np.testing.assert_array_equal(np.asarray(tiles[3].load()), np.asarray(expected))


def test_overlap_is_in_target_pixels_and_mpp_comes_from_any_metadata(tmp_path):
    path = write_pyramid(tmp_path / "x40.tif", slide_pixels(896, 896), mpp=0.25, downsamples=(1, 2))
    tiles = tile_slide(path, tissue=None, overlap=112)
    # 224 px tiles at 0.5 µm/px sharing 112 px: a 448 px level-0 footprint every 224 level-0 px.
    assert tiles.plan.stride_level0 == 224 and tiles.coords[:, 0].tolist()[:3] == [0, 224, 448] and len(tiles) == 9
    from h0mini.wsi.reader import mpp_from_properties

    assert mpp_from_properties({"aperio.MPP": "0.2527"}) == pytest.approx(0.2527)
    assert mpp_from_properties({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}) == pytest.approx(0.5)
    assert mpp_from_properties({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}) == pytest.approx(0.25)
    assert mpp_from_properties({"openslide.mpp-x": "0", "tiff.ResolutionUnit": "none"}) is None


def test_upsampling_is_refused_unless_asked_for(tmp_path):
    path = write_pyramid(tmp_path / "x20.tif", slide_pixels(448, 448), mpp=0.5)
    with pytest.raises(SlideError, match="allow_upsampling"):
        tile_slide(path, target_mpp=0.25, tissue=None)
    tiles = tile_slide(path, target_mpp=0.25, tissue=None, allow_upsampling=True)
    assert tiles.plan.read_size == 112 and tiles.plan.patch_size_level0 == 112
    assert np.asarray(tiles[0].load()).shape == (224, 224, 3)


def test_missing_mpp_names_the_override_and_the_override_works(tmp_path, model):
    path = write_pyramid(tmp_path / "bare.tif", slide_pixels(448, 448), mpp=None)
    with pytest.raises(SlideError, match=r"mpp=0\.25 .*--mpp 0\.25") as caught:
        tile_slide(path)
    assert "bare.tif" in str(caught.value) and "\n" not in str(caught.value)
    tiles = tile_slide(path, mpp=0.5, tissue=None)
    assert tiles.plan.mpp_source == "argument" and len(tiles) == 4
    assert h0mini.embed_slide(path, model, mpp=0.5, tissue=None).features.shape[0] == 4


def test_a_user_mask_replaces_the_detector(tmp_path):
    path = write_pyramid(tmp_path / "m.tif", slide_pixels(896, 896), mpp=0.5)
    mask = np.zeros((40, 40), bool)
    mask[:20, :20] = True  # the top-left quarter, at any resolution
    tiles = tile_slide(path, tissue=mask)
    assert tiles.coords.tolist() == [[0, 0], [224, 0], [0, 224], [224, 224]]
    with pytest.raises(SlideError, match="aspect ratio"):
        tile_slide(path, tissue=np.ones((10, 40), bool))


# -- bad input ------------------------------------------------------------------------------------------


def test_bad_slides_are_named_errors(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideError, match="not a whole-slide image") as caught:
        tile_slide(text)
    assert "notes.svs" in str(caught.value)
    with pytest.raises(SlideError, match="no such file"):
        tile_slide(tmp_path / "missing.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        tile_slide(tmp_path / "empty.svs")
    (tmp_path / "no_slides").mkdir()
    (tmp_path / "no_slides" / "tile.png").write_bytes(b"")
    with pytest.raises(SlideError, match="holds no slide files"):
        h0mini.embed_slides([tmp_path / "no_slides"], tmp_path / "out")


def test_a_blank_slide_gives_an_empty_output_with_its_attributes_and_a_warning(tmp_path, model):
    path = write_pyramid(tmp_path / "glass.tif", np.full((672, 672, 3), 242, np.uint8), mpp=0.5)
    out = tmp_path / "glass.h5"
    with pytest.warns(UserWarning, match="no tile has enough tissue"):
        result = h0mini.embed_slide(path, model, output_path=out)
    assert len(result) == 0
    saved = read_embeddings(out)
    assert saved.arrays["features"].shape == (0, 2 * model.num_features) and saved.coords.shape == (0, 2)
    assert saved.coords_attrs["patch_size_level0"] == 224


def test_an_unwritable_output_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the folder should go")
    monkeypatch.setattr(h0mini.wsi.embed, "TileEmbedder", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(OutputNotWritableError, match="taken"):
        h0mini.embed_slides([SLIDE], output_dir=blocker)


def test_a_truncated_slide_is_reported_and_the_others_go_on(tmp_path, checkpoint, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(SLIDE, slides / "good.svs")
    data = SLIDE.read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    code = main(["embed-slides", str(slides), "-o", str(out), "--weights", str(checkpoint), "--num-workers", "0"])
    captured = capsys.readouterr()
    assert code == 1
    rows = {Path(r["slide"]).name: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["good.svs"]["status"] == "done" and int(rows["good.svs"]["tiles"]) > 40
    assert rows["truncated.svs"]["status"] == "failed" and "truncated.svs" in rows["truncated.svs"]["error"]
    assert "Traceback" not in captured.err and "1 failed" in captured.err  # a failure's summary goes to stderr
    assert "good.svs: done, 59 tiles" in captured.out  # each slide's line as it ends
    assert (out / "good.h5").exists() and (out / "qc" / "good.png").exists() and not (out / "truncated.h5").exists()


# -- many slides: resume, shards -------------------------------------------------------------------


@pytest.fixture
def three_slides(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    pixels = slide_pixels(896, 1120)
    for i in range(3):
        write_pyramid(folder / f"s{i}.tif", np.roll(pixels, 224 * i, axis=1), mpp=0.5)
    return folder


def test_killing_a_multi_slide_run_and_rerunning_gives_the_uninterrupted_features(three_slides, checkpoint, tmp_path,
                                                                                  capsys):
    reference = tmp_path / "reference"
    assert main(["embed-slides", str(three_slides), "-o", str(reference), "--weights", str(checkpoint),
                 "--tissue", "none", "--num-workers", "0", "--precision", "fp32"]) == 0
    out = tmp_path / "out"
    command = [sys.executable, "-m", "h0mini", "embed-slides", str(three_slides), "-o", str(out), "--weights",
               str(checkpoint), "--tissue", "none", "--batch-size", "2", "--save-every", "2", "--num-workers", "0",
               "--precision", "fp32"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("s1.h5.parts/part-*.npz")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "s0.h5").exists() and not (out / "s1.h5").exists()  # one finished, one half done
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "already done" in finished.stdout
    for i in range(3):
        a, b = read_embeddings(reference / f"s{i}.h5"), read_embeddings(out / f"s{i}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        # fp32 both ways; batch size 2 against 8 only changes the matmul blocking: rows agree to float32
        # rounding (1e-5 on values of order 1; a wrong or repeated row is off by far more).
        np.testing.assert_allclose(a.arrays["features"], b.arrays["features"], atol=1e-5, rtol=0)
        assert a.tile_names == b.tile_names
    assert main(command[3:]) == 0  # a third run: nothing left to do
    lines = capsys.readouterr().out.splitlines()
    assert sum(": already done (20 tiles)" in line for line in lines) == 3 and "0 done, 3 already done" in lines[-1]


def test_resume_with_the_same_batches_is_bit_identical(three_slides, model, tmp_path):
    tiles = tile_slide(three_slides / "s0.tif", tissue=None)
    out = tmp_path / "s0.h5"
    embedder = h0mini.TileEmbedder(model, batch_size=2)
    from h0mini.job import embed_to_file

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = embedder._embed_pixels

    def failing(pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop
        return original(pixels)

    embedder._embed_pixels = failing
    with pytest.raises(Stop):
        embed_to_file(tiles.regions(), out, embedder, part_size=2, tiling=tiles.settings())
    embedder._embed_pixels = original
    embed_to_file(tiles.regions(), out, embedder, part_size=2, tiling=tiles.settings())
    uninterrupted = h0mini.embed_tiles(tiles, model, batch_size=2)
    np.testing.assert_array_equal(read_embeddings(out).arrays["features"], uninterrupted)


def test_shards_cover_each_slide_exactly_once():
    slides = [f"slide{i:02d}.svs" for i in range(23)]
    for count in (1, 2, 3, 7, 30):
        chosen = [s for k in range(count) for s in resolve_shard(f"{k}/{count}").select(slides)]
        assert sorted(chosen) == slides
    torchrun = resolve_shard(environ={"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert (torchrun.index, torchrun.count, torchrun.local_rank, torchrun.origin) == (2, 4, 0, "torchrun")
    slurm = resolve_shard(environ={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"})
    assert (slurm.index, slurm.count) == (4, 5)  # --array=1-5
    assert resolve_shard("1/3", environ={"RANK": "0", "WORLD_SIZE": "2"}) == Shard(1, 3, "argument")
    assert resolve_shard(environ={}).count == 1
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError, match="K/N"):
            resolve_shard(bad)


def test_sharded_runs_write_their_own_slides_and_one_summary(three_slides, checkpoint, tmp_path):
    out = tmp_path / "out"
    for k in range(2):
        assert main(["embed-slides", str(three_slides), "-o", str(out), "--weights", str(checkpoint), "--tissue",
                     "none", "--shard", f"{k}/2", "--num-workers", "0", "--no-qc"]) == 0
        rows = list(csv.DictReader(open(out / "summary.csv")))
        mine = [Path(r["slide"]).name for r in rows if r["status"] == "done"]
        assert mine == (["s0.tif", "s2.tif"] if k == 0 else ["s0.tif", "s1.tif", "s2.tif"])  # rows kept across runs
    assert sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s1.h5", "s2.h5"]
    assert not (out / "qc").exists() and not list((out / ".claims").iterdir())  # every claim given back


def test_torchrun_processes_share_the_slides(three_slides, checkpoint, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", "0", "-m", "h0mini", "embed-slides", str(three_slides), "-o", str(out), "--weights",
               str(checkpoint), "--tissue", "none", "--num-workers", "0", "--no-qc"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s1.h5", "s2.h5"]
    rows = {Path(r["slide"]).name: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert {name: row["status"] for name, row in rows.items()} == {f"s{i}.tif": "done" for i in range(3)}
    # Which rank embeds which slide depends on who starts first (a rank that finishes its share helps the
    # other); every slide is embedded once either way.
    assert sum(": done, " in line for line in result.stdout.splitlines()) == 3


def test_cli_usage_errors_come_before_the_model(tmp_path, capsys):
    assert main(["embed-slides", str(SLIDE), "-o", str(tmp_path), "--shard", "4/4"]) == 2  # one line, no usage dump
    assert "K/N" in capsys.readouterr().err
    assert main(["embed-slides", str(tmp_path / "none.svs"), "-o", str(tmp_path)]) == 1
    assert "none.svs" in capsys.readouterr().err
