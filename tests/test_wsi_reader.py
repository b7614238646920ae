"""The reader layer under every slide path: bounded handles, reopening after read errors, formats."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import h0mini
from h0mini.errors import SlideError
from h0mini.wsi import qc_image, reader, tile_slide
from h0mini.wsi.reader import SlideSource
from helpers import SLIDE, write_checkpoint

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("scipy")

READERS = ["openslide"] + (["tiffslide"] if __import__("importlib").util.find_spec("tiffslide") else [])


@pytest.fixture(autouse=True)
def no_open_slides():
    reader.release_all()
    yield
    reader.release_all()


def he_pixels(width: int = 896, height: int = 896) -> np.ndarray:
    """Real H&E from the CC0 slide's tissue, level 0."""
    image = Image.open(SLIDE)
    image.seek(0)
    return np.asarray(image.convert("RGB"))[224 : 224 + height, 672 : 672 + width].copy()


def write_tiff(path: Path, pixels: np.ndarray, *, mpp: float = 0.5, tile: int = 224, compression: str = "zlib") -> Path:
    tifffile.imwrite(path, pixels, tile=(tile, tile), compression=compression, photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


class CountingOpenSlide(openslide.OpenSlide):
    """OpenSlide that counts its live handles (OpenSlide 4 keeps no file descriptor open between reads)."""

    live = 0

    def __init__(self, filename):
        super().__init__(filename)
        CountingOpenSlide.live += 1

    def close(self):
        CountingOpenSlide.live -= 1
        super().close()


def _slide_fds(folder: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:
            pass
    return count


# -- 1. bounded handles -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", READERS)
def test_fifty_slides_leave_at_most_the_limit_open(tmp_path, monkeypatch, name):
    monkeypatch.setattr(openslide, "OpenSlide", CountingOpenSlide)
    CountingOpenSlide.live = 0
    first = write_tiff(tmp_path / "s00.tif", he_pixels(448, 448))
    paths = [first] + [Path(shutil.copy(first, tmp_path / f"s{i:02d}.tif")) for i in range(1, 50)]
    expected = np.asarray(Image.fromarray(he_pixels(448, 448)).crop((224, 0, 448, 224)))
    for path in paths:
        region = SlideSource(str(path), name).open().read(0, (224, 0), (224, 224))
        np.testing.assert_array_equal(np.asarray(region), expected)
    assert reader.open_slide_count() == reader.MAX_OPEN_SLIDES == 4
    if name == "openslide":
        assert CountingOpenSlide.live == 4  # the other 46 were closed when evicted
    else:
        assert _slide_fds(tmp_path) == 4  # tiffslide keeps its file open: one descriptor per slide
    assert reader.release(paths[-1]) == 1 and reader.open_slide_count() == 3
    reader.release_all()
    assert reader.open_slide_count() == 0 and _slide_fds(tmp_path) == 0
    if name == "openslide":
        assert CountingOpenSlide.live == 0


def test_the_limit_is_settable_and_a_closed_slide_reopens_on_use(tmp_path):
    paths = [write_tiff(tmp_path / f"s{i}.tif", np.roll(he_pixels(448, 448), 50 * i, axis=1)) for i in range(3)]
    previous = reader.set_open_slide_limit(2)
    try:
        slides = [SlideSource(str(p)).open() for p in paths]
        assert reader.open_slide_count() == 2 and slides[0].closed  # the least recently used went first
        # Someone still holding the evicted slide reads it: it reopens and counts among the open ones.
        assert slides[0].read(0, (0, 0), (8, 8)).size == (8, 8)
        assert not slides[0].closed and slides[1].closed and reader.open_slide_count() == 2
        SlideSource(str(paths[0])).close()
        assert slides[0].closed and reader.open_slide_count() == 1
        with pytest.raises(ValueError, match="positive integer"):
            reader.set_open_slide_limit(0)
    finally:
        reader.set_open_slide_limit(previous)


def test_tile_slide_qc_and_reads_share_one_handle_per_process(tmp_path):
    path = write_tiff(tmp_path / "s.tif", he_pixels(448, 448))
    tiles = tile_slide(path, tissue="otsu", min_tissue=0.0)
    qc_image(tiles)
    tiles[0].load()
    assert reader.open_slide_count() == 1


def test_a_replaced_file_is_reopened(tmp_path):
    path = write_tiff(tmp_path / "s.tif", he_pixels(448, 448))
    assert SlideSource(str(path)).open().dimensions == (448, 448)
    replacement = write_tiff(tmp_path / "other.tif", he_pixels(672, 448))
    os.replace(replacement, path)
    assert SlideSource(str(path)).open().dimensions == (672, 448)
    assert reader.open_slide_count() == 1


def _child_view(path):
    before = reader.open_slide_count()
    slide = SlideSource(path, "openslide").open()
    inherited = reader._HANDLES._inherited
    return before, len(inherited), any(s is slide for s in inherited), np.asarray(slide.read(0, (0, 0), (32, 32)))


def test_a_forked_worker_opens_its_own_handle(tmp_path):
    path = str(write_tiff(tmp_path / "s.tif", he_pixels(448, 448)))
    parent = SlideSource(path, "openslide").open()
    pixels = np.asarray(parent.read(0, (0, 0), (32, 32)))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        before, inherited, reused, child_pixels = pool.apply(_child_view, (path,))
    assert before == 0 and inherited == 1 and not reused  # the parent's handle is set aside, never used
    np.testing.assert_array_equal(child_pixels, pixels)
    assert reader.open_slide_count() == 1 and not parent.closed


def _exit_now():
    os._exit(0)


def test_a_fork_waits_for_a_slide_call_in_another_thread():
    """A worker forked while another thread is inside OpenSlide (or importing it) would inherit
    locks that nobody releases, and hang: the fork waits for the call to end."""
    import threading
    import time

    inside, ended = threading.Event(), []

    def call():
        with reader._FORK_GUARD:
            inside.set()
            time.sleep(0.3)
            ended.append(time.monotonic())

    thread = threading.Thread(target=call)
    thread.start()
    assert inside.wait(timeout=10)
    child = multiprocessing.get_context("fork").Process(target=_exit_now)
    child.start()
    forked = time.monotonic()
    child.join()
    thread.join()
    assert ended and forked >= ended[0]
    with reader._FORK_GUARD:  # a fork from inside a call does not wait for itself
        started = time.monotonic()
        child = multiprocessing.get_context("fork").Process(target=_exit_now)
        child.start()
        assert time.monotonic() - started < reader.FORK_WAIT / 2
        child.join()


# -- 2. reopening after a read error -----------------------------------------------------------------


BAD_TILES = (1, 6, 11)  # of the 4 x 4 stored tiles, row by row


def write_corrupt_slide(path: Path) -> Path:
    """A tiled JPEG TIFF whose stored tiles 1, 6 and 11 are not JPEG any more (cut SOI marker, junk data)."""
    write_tiff(path, he_pixels(896, 896), compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for index in BAD_TILES:
        start, count = offsets[index], counts[index]
        data[start : start + count] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
        data[start : start + 2] = b"\x00\x00"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder)
    return h0mini.load_model(folder)


@pytest.mark.parametrize("stored", ["reader", "stored tiles"])
@pytest.mark.parametrize("name", READERS)
def test_only_the_corrupt_tiles_are_skipped(tmp_path, model, monkeypatch, name, stored):
    # Through the reader's read_region (H0MINI_STORED_TILES=0, and any slide the stored-tile path
    # does not take), and through the stored JPEG tiles: the same three tiles, and only those.
    monkeypatch.setenv("H0MINI_STORED_TILES", "0" if stored == "reader" else "1")
    path = write_corrupt_slide(tmp_path / "corrupt.tif")
    if name == "openslide":  # the sticky error this guards against: one bad tile fails every later read
        handle = openslide.OpenSlide(str(path))
        with pytest.raises(openslide.OpenSlideError):
            handle.read_region((224, 0), 0, (224, 224))
        with pytest.raises(openslide.OpenSlideError):
            handle.read_region((0, 0), 0, (224, 224))
        handle.close()
    with pytest.warns(h0mini.SkippedTilesWarning, match="3 tile"):
        result = h0mini.embed_slide(path, model, tissue=None, reader=name, on_error="skip", num_workers=0)
    skipped = sorted(s["index"] for s in result.skipped)
    assert skipped == list(BAD_TILES) and len(result) == 16 - len(BAD_TILES)
    good = [i for i in range(16) if i not in BAD_TILES]
    assert [tuple(c) for c in result.coords.tolist()] == [((i % 4) * 224, (i // 4) * 224) for i in good]
    if stored == "reader":
        assert all("Not a JPEG" in s["reason"] for s in result.skipped)
    # The reader itself: the bad region is a named error, and the next region reads again.
    clean = SlideSource(str(path), name).open()
    with pytest.raises(SlideError, match=r"cannot read 224x224 px at level 0, \(224, 0\)"):
        clean.read(0, (224, 0), (224, 224))
    assert np.asarray(clean.read(0, (448, 0), (224, 224))).std() > 5


# -- 8. an absurd µm/px ---------------------------------------------------------------------------------


def test_a_slide_smaller_than_one_tile_says_the_mpp_looks_wrong(tmp_path):
    path = write_tiff(tmp_path / "s.tif", he_pixels(896, 896))
    with pytest.raises(SlideError, match=r"at 0\.001 µm/px \(you passed so\) the slide is 0\.896 x 0\.896 µm, smaller "
                                         r"than one 224 px tile at 0\.5 µm/px \(112 µm\).*looks wrong.*--mpp") as caught:
        tile_slide(path, mpp=0.001)
    assert "s.tif" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SlideError, match="metadata says so"):
        tile_slide(write_tiff(tmp_path / "m.tif", he_pixels(448, 448), mpp=0.0001))
    assert len(tile_slide(path, mpp=0.5, tissue=None)) == 16  # the same slide at its real µm/px


# -- 7. QC leftovers ------------------------------------------------------------------------------------


def test_writing_a_qc_picture_removes_a_killed_writers_temporary(tmp_path):
    from h0mini.wsi import save_qc_image

    tiles = tile_slide(write_tiff(tmp_path / "s.tif", he_pixels(448, 448)), tissue=None)
    qc = tmp_path / "qc"
    qc.mkdir()
    dead = multiprocessing.get_context("fork").Process(target=_exit_now)
    dead.start()
    dead.join()  # a pid that no process has now
    stale = qc / f".s.png.{dead.pid}-0a1b2c3d.tmp"
    stale.write_bytes(b"half a png")
    live = qc / f".s.png.{os.getpid()}-0a1b2c3d.tmp"  # a live writer's is kept
    live.write_bytes(b"being written")
    save_qc_image(tiles, qc / "s.png")
    assert sorted(p.name for p in qc.iterdir()) == sorted(["s.png", live.name])


# -- 4. OME-TIFF ----------------------------------------------------------------------------------------


def write_ome_pyramid(path: Path, pixels: np.ndarray, physical_size: float, unit: str) -> Path:
    """An OME-TIFF pyramid as tifffile writes it: level 0, the other levels in SubIFDs, µm/px only in the OME-XML."""
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(pixels, subifds=2, tile=(224, 224), compression="zlib", photometric="rgb",
                  metadata={"PhysicalSizeX": physical_size, "PhysicalSizeXUnit": unit,
                            "PhysicalSizeY": physical_size, "PhysicalSizeYUnit": unit})
        for factor in (2, 4):
            level = Image.fromarray(pixels).resize((pixels.shape[1] // factor, pixels.shape[0] // factor),
                                                   Image.Resampling.BOX)
            tif.write(np.asarray(level), subfiletype=1, tile=(224, 224), compression="zlib", photometric="rgb")
    return path


@pytest.mark.skipif("tiffslide" not in READERS, reason="tiffslide reads OME's SubIFD levels")
def test_an_ome_pyramid_is_read_by_levels_with_its_ome_mpp(tmp_path):
    pixels = he_pixels(896, 896)
    path = write_ome_pyramid(tmp_path / "slide.ome.tif", pixels, 0.00025, "mm")  # 0.25 µm/px, in mm
    assert len(openslide.OpenSlide(str(path)).level_dimensions) == 1  # what OpenSlide sees of it
    tiles = tile_slide(path, tissue=None)
    assert tiles.source.reader == "tiffslide"
    assert tiles.plan.level0_mpp == pytest.approx(0.25) and tiles.plan.mpp_source == "metadata"
    assert (tiles.plan.read_level, tiles.plan.read_size, tiles.plan.patch_size_level0) == (1, 224, 448)
    level1 = np.asarray(Image.fromarray(pixels).resize((448, 448), Image.Resampling.BOX))
    np.testing.assert_array_equal(np.asarray(tiles[1].load()), level1[0:224, 224:448])
    renamed = tmp_path / "plain-name.tif"  # found by its content, not its name
    os.replace(path, renamed)
    assert tile_slide(renamed, tissue=None).source.reader == "tiffslide"
    from h0mini.wsi.reader import ome_mpp

    assert ome_mpp('<OME xmlns="x"><Image><Pixels PhysicalSizeX="0.5"/></Image></OME>') == 0.5  # µm by default
    assert ome_mpp('<OME><Image><Pixels PhysicalSizeX="250" PhysicalSizeXUnit="nm"/></Image></OME>') == 0.25
    assert ome_mpp("<OME><Image><Pixels/></Image></OME>") is None and ome_mpp("Aperio Image Library") is None


def test_tifffile_notes_are_kept_per_thread_whatever_other_threads_do(caplog):
    """The planner thread probes slides while the main thread opens others: neither may unsilence the other."""
    import logging
    import threading

    from h0mini.wsi.tiff_log import tifffile_notes

    log = logging.getLogger("tifffile")
    inside, leave = threading.Event(), threading.Event()
    theirs = []

    def other_thread():
        with tifffile_notes() as notes:
            inside.set()
            leave.wait(10)
            log.warning("their slide is damaged")
        theirs.extend(notes)

    with caplog.at_level(logging.WARNING):
        with tifffile_notes() as mine:
            thread = threading.Thread(target=other_thread)
            thread.start()
            inside.wait(10)
            leave.set()
            thread.join()  # the other block ended while this one is open
            log.warning("invalid offset to first page")
        log.warning("outside any block")
    assert mine == ["invalid offset to first page"] and theirs == ["their slide is damaged"]
    assert [r.getMessage() for r in caplog.records if r.name == "tifffile"] == ["outside any block"]


# -- 5. truncated files ----------------------------------------------------------------------------------


def test_a_truncated_slide_is_one_line_that_says_truncated(tmp_path, capsys, caplog):
    import logging

    # As after any earlier tifffile warning in the process: the logger has cached WARNING as enabled
    # (setting Logger.level directly, as an earlier version did, then silenced nothing).
    assert logging.getLogger("tifffile").isEnabledFor(logging.WARNING)
    data = SLIDE.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="looks truncated or corrupt") as caught:
        tile_slide(cut)
    message = str(caught.value)
    assert "cut.svs" in message and "\n" not in message and str(len(data) // 2) in message
    assert "tifffile" not in capsys.readouterr().err and not [r for r in caplog.records if r.name == "tifffile"]
    tiled = write_tiff(tmp_path / "tiled.tif", he_pixels(896, 896))  # its tile data cut: opens, reads fail
    tiled.write_bytes(tiled.read_bytes()[: tiled.stat().st_size // 3])
    with pytest.raises(SlideError, match="looks truncated or corrupt"):
        SlideSource(str(tiled), "openslide").open().read(0, (672, 672), (224, 224))


# -- 6. read once for tissue and QC ------------------------------------------------------------------------


def test_a_slide_without_a_pyramid_is_read_whole_once_for_tissue_and_qc(tmp_path, monkeypatch):
    path = write_tiff(tmp_path / "flat.tif", np.tile(he_pixels(600, 600), (2, 2, 1)), mpp=4.0)  # one level
    read = []
    original = reader.Slide.read

    def counting(self, level, location, size):
        read.append(size[0] * size[1])
        return original(self, level, location, size)

    monkeypatch.setattr(reader.Slide, "read", counting)
    tiles = tile_slide(path, target_mpp=4.0)
    assert sum(read) == 1200 * 1200 and tiles.thumbnail.size == (600, 600)  # 8 µm/px, from level 0
    picture = qc_image(tiles)
    assert sum(read) == 1200 * 1200 and max(picture.size) == 1200  # the QC picture read nothing more


# -- 3. DICOM --------------------------------------------------------------------------------------------


@pytest.fixture
def dicom_cohort(tmp_path):
    pytest.importorskip("pydicom")
    from wsi_files import write_dicom_wsi

    cohort = tmp_path / "cohort"
    write_dicom_wsi(cohort / "case-1.v2", he_pixels(896, 896), mpp=0.25, downsamples=(1, 2, 4))
    write_dicom_wsi(cohort / "case-2", np.roll(he_pixels(896, 896), 224, axis=1), mpp=0.25, downsamples=(1, 2))
    return cohort


def test_a_dicom_folder_is_one_slide_and_a_folder_of_them_one_per_subfolder(dicom_cohort):
    from h0mini.wsi import find_slides
    from h0mini.wsi.grid import slide_stem

    one, two = str(dicom_cohort / "case-1.v2"), str(dicom_cohort / "case-2")
    assert find_slides([dicom_cohort]) == [one, two]  # the usual layout: one folder per slide
    assert find_slides([one]) == [one]  # not three slides under UID names
    assert find_slides([f"{one}/*.dcm", f"{one}/level-2.dcm", one]) == [one]  # a series counts once
    assert [slide_stem(p) for p in (one, f"{one}/level-1.dcm")] == ["case-1.v2", "case-1.v2"]
    tiles = tile_slide(one, tissue=None)
    assert tiles.source.reader == "openslide" and tiles.plan.level0_mpp == pytest.approx(0.25)
    assert (tiles.plan.read_level, tiles.plan.read_size, len(tiles)) == (1, 224, 4)  # 0.5 µm/px: level 1, as is
    level1 = np.asarray(Image.fromarray(he_pixels(896, 896)).resize((448, 448), Image.Resampling.BOX))
    np.testing.assert_array_equal(np.asarray(tiles[3].load()), level1[224:448, 224:448])
    with pytest.raises(SlideError, match="tiffslide does not read"):
        tile_slide(one, reader="tiffslide")


def test_a_glob_leaves_out_the_files_beside_the_slides_and_says_so(tmp_path, caplog):
    from h0mini.wsi import find_slides

    for name in ("a.svs", "b.TIF", "manifest.csv", "notes.txt", "b.TIF.md5", "c.vsi"):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level("WARNING", logger="h0mini.wsi.discover"):
        assert find_slides([f"{tmp_path}/*"]) == [str(tmp_path / "a.svs"), str(tmp_path / "b.TIF")]
    assert "4 files that are not slides left out (b.TIF.md5, c.vsi, manifest.csv and 1 more)" in caplog.text
    assert find_slides([f"{tmp_path}/*.vsi"]) == [str(tmp_path / "c.vsi")]  # a named suffix is taken at its word
    with pytest.raises(SlideError, match=r"matches no slide files .*; it matched manifest.csv, notes.txt"):
        find_slides([f"{tmp_path}/[mn]*"])


def test_embed_slides_over_a_dicom_cohort_writes_one_output_per_slide(dicom_cohort, tmp_path, model):
    statuses = h0mini.embed_slides([dicom_cohort], model, output_dir=tmp_path / "out", tissue=None, num_workers=0,
                                   qc=False)
    assert [(Path(s.slide).name, s.status, s.tiles) for s in statuses] == [("case-1.v2", "done", 4),
                                                                           ("case-2", "done", 4)]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == ["case-1.v2.h5", "case-2.h5"]
