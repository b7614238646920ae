"""The stored-JPEG-tile reader (h0mini.wsi.stored_tiles): the same pixels as OpenSlide, named errors on
damaged tiles, bounded caches. Slides here are a few hundred KB, written with tifffile."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import h0mini
from h0mini.embed import SkippedTilesWarning
from h0mini.errors import SlideError
from h0mini.wsi import stored_tiles, tile_slide
from helpers import SLIDE, write_checkpoint

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
imagecodecs = pytest.importorskip("imagecodecs")
pytest.importorskip("simplejpeg")
pytest.importorskip("scipy")

TILE = 256


def he_pixels(width: int = 1200, height: int = 1000) -> np.ndarray:
    image = Image.open(SLIDE)
    return np.asarray(image.convert("RGB"))[:height, :width].copy()


def jpeg_tiles(level: np.ndarray, colorspace: str, damage=None):
    """The level's tiles, JPEG-encoded in ``colorspace`` ("rgb": Aperio's way; "ycbcr"), row-major."""
    index = 0
    for y in range(0, level.shape[0], TILE):
        for x in range(0, level.shape[1], TILE):
            tile = np.zeros((TILE, TILE, 3), np.uint8)
            part = level[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            data = imagecodecs.jpeg8_encode(tile, level=90, colorspace="rgb", outcolorspace=colorspace)
            yield damage(index, data) if damage else data
            index += 1


def write_jpeg_slide(path: Path, level0: np.ndarray, colorspace="rgb", downsamples=(1, 4), mpp=0.25, damage=None):
    """A tiled JPEG pyramid; with ``colorspace="rgb"`` the JPEG data is RGB and the TIFF says RGB, as in SVS."""
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate(downsamples):
            image = Image.fromarray(level0)
            if factor > 1:
                image = image.resize((level0.shape[1] // factor, level0.shape[0] // factor), Image.Resampling.BOX)
            level = np.asarray(image)
            tif.write(jpeg_tiles(level, colorspace, damage if i == 0 else None), shape=level.shape, dtype=np.uint8,
                      tile=(TILE, TILE), compression="jpeg", photometric="rgb", subfiletype=1 if i else 0,
                      resolution=(1e4 / (mpp * factor),) * 2, resolutionunit="CENTIMETER")
    if colorspace == "rgb":  # tifffile labels JPEG as YCbCr: say RGB, as Aperio does
        with tifffile.TiffFile(path, mode="r+") as tif:
            for page in tif.pages:
                page.tags["PhotometricInterpretation"].overwrite(2)
    return path


def openslide_region(path, level, location, size):
    with openslide.OpenSlide(str(path)) as handle:
        return np.asarray(handle.read_region(location, level, (size, size)).convert("RGB"))


def fast_region(path, level, location, size, scale=1):
    with openslide.OpenSlide(str(path)) as handle:
        dims, downsamples = handle.level_dimensions, handle.level_downsamples
    return stored_tiles.read_stored(str(path), dims, downsamples, level, location, size, scale)


def openslide_tiles(tiles):
    """Each tile as the OpenSlide + PIL BOX path reads it (the fast path switched off)."""
    previous = os.environ.get("H0MINI_STORED_TILES")
    os.environ["H0MINI_STORED_TILES"] = "0"
    try:
        return [np.asarray(region.load()) for region in tiles.regions()]
    finally:
        if previous is None:
            del os.environ["H0MINI_STORED_TILES"]
        else:
            os.environ["H0MINI_STORED_TILES"] = previous


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.delenv("H0MINI_STORED_TILES", raising=False)
    monkeypatch.delenv("H0MINI_JPEG_SCALING", raising=False)
    for path in {key[0] for key in stored_tiles._SLIDES}:
        stored_tiles.release(path)
    yield


@pytest.fixture(scope="module")
def pixels():
    return he_pixels()


# -- same pixels as OpenSlide -------------------------------------------------------------------------


@pytest.mark.parametrize("colorspace", ["rgb", "ycbcr"])
def test_regions_equal_openslide_exactly_at_every_level(tmp_path, pixels, colorspace):
    path = write_jpeg_slide(tmp_path / f"{colorspace}.tif", pixels, colorspace)
    # corners inside one stored tile, across 2x2 and 3x3 stored tiles, touching the right/bottom edges
    for level, location, size in [(0, (0, 0), 224), (0, (100, 300), 448), (0, (752, 552), 448), (0, (256, 256), 256),
                                  (1, (40, 80), 224), (1, (4, 4), 100)]:
        fast = fast_region(path, level, location, size)
        assert fast is not None, (level, location)
        np.testing.assert_array_equal(fast, openslide_region(path, level, location, size), err_msg=str(location))


def test_the_cc0_svs_with_shared_jpeg_tables_and_rgb_data_equals_openslide():
    with tifffile.TiffFile(SLIDE) as tif:  # what this test is about: Aperio's tables and RGB-coded JPEG
        page = tif.pages[0]
        assert page.jpegtables and int(page.photometric) == 2 and page.tile == (240, 240)
    for location in [(0, 0), (224, 448), (1996, 2743), (700, 1000)]:
        np.testing.assert_array_equal(fast_region(SLIDE, 0, location, 224), openslide_region(SLIDE, 0, location, 224))


def test_slide_tiles_through_the_fast_path_equal_openslide_plus_pil_box(tmp_path, pixels):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels)
    tiles = tile_slide(path, tissue=None, overlap=112)  # 0.25 µm/px level 0: 448 px read, BOX to 224
    assert tiles.plan.read_size == 448 and tiles.plan.read_level == 0
    expected = openslide_tiles(tiles)
    got = [np.asarray(region.load()) for region in tiles.regions()]
    assert stored_tiles.cache_info()["tiles"] > 0  # the fast path was taken
    assert len(got) == len(expected) > 4
    for index, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, b, err_msg=tiles[index].name)


def test_the_cc0_slide_tiles_are_unchanged():
    tiles = tile_slide(SLIDE, tissue=None)
    expected = openslide_tiles(tiles)
    for region, want in zip(tiles.regions(), expected):
        np.testing.assert_array_equal(np.asarray(region.load()), want, err_msg=region.name)


def test_regions_the_fast_path_does_not_match_go_to_openslide(tmp_path, pixels):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels)
    assert fast_region(path, 1, (2, 0), 64) is None  # not on a whole level-1 pixel: OpenSlide interpolates
    assert fast_region(path, 0, (1000, 0), 448) is None  # past the level's edge: OpenSlide pads
    zlib = tmp_path / "zlib.tif"
    tifffile.imwrite(zlib, pixels, tile=(TILE, TILE), compression="zlib", photometric="rgb")
    assert fast_region(zlib, 0, (0, 0), 224) is None
    tiles = tile_slide(zlib, tissue=None, mpp=0.5)
    np.testing.assert_array_equal(np.asarray(tiles[0].load()), pixels[:224, :224])


def test_the_fast_path_can_be_switched_off(tmp_path, pixels, monkeypatch):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels)
    monkeypatch.setenv("H0MINI_STORED_TILES", "0")
    before = stored_tiles.cache_info()["tiles"]  # other tests of this process may have filled the cache
    tile_slide(path, tissue=None)[0].load()
    assert stored_tiles.cache_info()["tiles"] == before


def test_dct_scaling_is_opt_in_and_close_to_box(tmp_path, pixels, monkeypatch):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels)
    tiles = tile_slide(path, tissue=None)
    box = np.asarray(tiles[3].load()).astype(int)
    monkeypatch.setenv("H0MINI_JPEG_SCALING", "dct")
    dct = np.asarray(tiles[3].load()).astype(int)
    assert dct.shape == box.shape == (224, 224, 3)
    difference = np.abs(dct - box)
    # libjpeg's 1/2 IDCT is not an area average; measured here: mean ~1 level, max a few tens (docs/slide-reading.md)
    assert 0 < difference.mean() < 3, difference.mean()


# -- damaged tiles ------------------------------------------------------------------------------------


def damaged(kind):
    def damage(index, data):
        if index != 6:  # column 1, row 1 of a 5-column level
            return data
        if kind == "truncated":
            return data[: len(data) // 2]
        if kind == "corrupt":
            return data[:700] + bytes(64) + data[764:]
        if kind == "empty":
            return b"\xff\xd8"  # a JPEG start and nothing else
        raise AssertionError(kind)
    return damage


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "empty"])
def test_a_damaged_stored_tile_is_that_tiles_error_never_black_pixels(tmp_path, pixels, kind):
    path = write_jpeg_slide(tmp_path / f"{kind}.tif", pixels, downsamples=(1,), damage=damaged(kind))
    tiles = tile_slide(path, tissue=None, mpp=0.5)
    bad = [r for r in tiles.regions() if touches_tile_1_1(r.coords, 224)]
    assert [r.coords for r in bad] == [(224, 224), (448, 224), (224, 448), (448, 448)]
    for region in bad:
        x, y = region.coords
        with pytest.raises(SlideError, match=rf"tile at \({x}, {y}\): stored tile \(column 1, row 1\) of level 0"):
            region.load()
    good = [r for r in tiles.regions() if r not in bad]
    with openslide.OpenSlide(str(path)) as handle:  # OpenSlide reads them too (its handle dies on the bad ones)
        expected = [np.asarray(handle.read_region(r.coords, 0, (224, 224)).convert("RGB")) for r in good]
    for region, want in zip(good, expected):
        np.testing.assert_array_equal(np.asarray(region.load()), want, err_msg=region.name)


def touches_tile_1_1(coords, size):
    return all(c < 2 * TILE and c + size > TILE for c in coords)


def patch_tile_table(path, index, offset=None, count=None):
    with tifffile.TiffFile(path, mode="r+") as tif:
        page = tif.pages[0]
        if offset is not None:
            offsets = list(page.dataoffsets)
            offsets[index] = offset
            page.tags["TileOffsets"].overwrite(offsets)
        if count is not None:
            counts = list(page.databytecounts)
            counts[index] = count
            page.tags["TileByteCounts"].overwrite(counts)


@pytest.mark.parametrize("fault", ["past the end", "zero length"])
def test_a_tile_table_pointing_nowhere_is_that_tiles_error(tmp_path, pixels, fault):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels, downsamples=(1,))
    if fault == "past the end":
        patch_tile_table(path, 6, offset=os.path.getsize(path) + 10)
    else:
        patch_tile_table(path, 6, count=0)
    region = tile_slide(path, tissue=None, mpp=0.5)  # 224 px read as is: tile (1, 1) holds (256, 256)
    bad = next(r for r in region.regions() if r.coords == (224, 224))
    with pytest.raises(SlideError, match="past the end of the file" if fault == "past the end" else "zero-length"):
        bad.load()
    region[0].load()  # the slide's other tiles still read


def test_skip_names_the_damaged_tiles_and_embeds_the_rest_in_workers(tmp_path, pixels):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels, downsamples=(1,), damage=damaged("truncated"))
    folder = tmp_path / "ckpt"
    write_checkpoint(folder)
    model = h0mini.load_model(folder)
    tiles = tile_slide(path, tissue=None, mpp=0.5)
    with pytest.warns(SkippedTilesWarning) as caught:
        result = h0mini.embed_tiles(tiles, model, on_error="skip", num_workers=2, batch_size=4)
    skipped = [w.message for w in caught if isinstance(w.message, SkippedTilesWarning)][0].skipped
    bad = [i for i, region in enumerate(tiles.regions()) if touches_tile_1_1(region.coords, 224)]
    assert len(bad) == 4  # (224|448, 224|448) each hold part of stored tile (1, 1)
    assert sorted(s.index for s in skipped) == bad
    assert all("column 1, row 1" in s.reason and tiles[s.index].name in s.source for s in skipped)
    assert len(result) == len(tiles) - len(bad)


# -- memory -------------------------------------------------------------------------------------------


def test_the_decoded_tile_cache_stays_under_its_bound(tmp_path, pixels, monkeypatch):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels)
    monkeypatch.setattr(stored_tiles, "CACHE_BYTES", 3 * TILE * TILE * 3)  # three tiles
    for region in tile_slide(path, tissue=None).regions():
        region.load()
        info = stored_tiles.cache_info()
        assert info["bytes"] <= info["bound"] and info["tiles"] <= 3
    stored_tiles.release(str(path))
    assert stored_tiles.cache_info()["tiles"] == 0


def test_a_rewritten_slide_is_read_again_not_from_the_cache(tmp_path, pixels):
    path = write_jpeg_slide(tmp_path / "s.tif", pixels, downsamples=(1,))
    first = fast_region(path, 0, (0, 0), 224)
    write_jpeg_slide(path, 255 - pixels, downsamples=(1,))
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    second = fast_region(path, 0, (0, 0), 224)
    np.testing.assert_array_equal(second, openslide_region(path, 0, (0, 0), 224))
    assert not np.array_equal(first, second)


def test_box_halve_equals_pil_box_bit_for_bit():
    pil_box = lambda image: np.asarray(Image.fromarray(image).resize(  # noqa: E731
        (image.shape[1] // 2, image.shape[0] // 2), Image.Resampling.BOX))
    a, b = (v.astype(np.uint8) for v in np.divmod(np.arange(65536), 256))
    every_pair = np.stack([a, b], axis=1).repeat(3, axis=1).reshape(1, 131072, 3)  # every (a, b) side by side
    np.testing.assert_array_equal(stored_tiles.box_halve(np.repeat(every_pair, 2, axis=0)),
                                  pil_box(np.repeat(every_pair, 2, axis=0)))
    every_column_pair = every_pair.reshape(131072, 1, 3)  # every (a, b) one above the other
    np.testing.assert_array_equal(stored_tiles.box_halve(np.repeat(every_column_pair, 2, axis=1)),
                                  pil_box(np.repeat(every_column_pair, 2, axis=1)))
    rng = np.random.default_rng(0)
    for shape in [(448, 448, 3), (2, 2, 3), (64, 6, 3), (10, 512, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(stored_tiles.box_halve(image), pil_box(image))
    region = he_pixels(448, 448)[:, ::-1]  # a real tile, not contiguous
    np.testing.assert_array_equal(stored_tiles.box_halve(region), pil_box(np.ascontiguousarray(region)))


# -- decoding on the model's device (nvJPEG on CUDA; torchvision/torchcodec's CPU decoder here) ---------


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_box_downsample_equals_pil_box(factor):
    import torch

    from h0mini.jpeg import box_downsample

    rng = np.random.default_rng(factor)
    image = rng.integers(0, 256, (factor * 37, factor * 23, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((23, 37), Image.Resampling.BOX))
    got = box_downsample(torch.from_numpy(image).permute(2, 0, 1).contiguous(), factor).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def device_decoder_or_skip():
    from h0mini.jpeg import jpeg_decoder

    try:
        jpeg_decoder()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"no device JPEG decoder: {error}")


@pytest.mark.parametrize("slide", ["40x", "cc0"])
def test_regions_decoded_on_the_device_equal_the_cpu_path(tmp_path, pixels, slide):
    import torch

    from h0mini.jpeg import EncodedRegion, decode_on_device
    from h0mini.preprocess import Preprocessing

    device_decoder_or_skip()
    path = SLIDE if slide == "cc0" else write_jpeg_slide(tmp_path / "s.tif", pixels)
    tiles = tile_slide(path, tissue=None)
    preprocessing = Preprocessing.from_model(write_checkpoint(tmp_path / "ckpt"))
    regions = tiles.regions()[:6]
    encoded = [region.encoded_for_device(preprocessing) for region in regions]
    assert all(isinstance(e, EncodedRegion) for e in encoded)
    decoded = decode_on_device(encoded, torch.device("cpu"))
    for region, tensor in zip(regions, decoded):
        np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(region.load()), err_msg=region.name)


def test_embedding_with_device_decoding_equals_cpu_decoding_and_skips_damaged_tiles(tmp_path, pixels, monkeypatch):
    from h0mini import jpeg

    device_decoder_or_skip()
    decoded = []
    real = jpeg.decode_regions
    monkeypatch.setattr(jpeg, "decode_regions", lambda regions, device: decoded.extend(regions) or real(regions, device))
    path = write_jpeg_slide(tmp_path / "s.tif", pixels, downsamples=(1,), damage=damaged("truncated"))
    write_checkpoint(tmp_path / "ckpt")
    model = h0mini.load_model(tmp_path / "ckpt")
    tiles = tile_slide(path, tissue=None, overlap=112)  # 12 tiles, 4 of them on the damaged stored tile
    runs = {}
    for decode in ("cpu", "device"):
        with pytest.warns(SkippedTilesWarning) as caught:
            runs[decode] = h0mini.embed_tiles(tiles, model, on_error="skip", num_workers=1, batch_size=2,
                                              jpeg_decode=decode, device="cpu")
        runs[decode + " skipped"] = [w.message for w in caught if isinstance(w.message, SkippedTilesWarning)][0].skipped
    assert [s.index for s in runs["cpu skipped"]] == [s.index for s in runs["device skipped"]]
    np.testing.assert_allclose(runs["device"], runs["cpu"], rtol=0, atol=1e-6)
    assert len(decoded) == len(tiles) - len(runs["cpu skipped"]) > 0  # every good tile went the device way


def test_a_truncated_tiff_falls_back_without_tifffile_log_lines(tmp_path, caplog):
    from helpers import SLIDE

    data = SLIDE.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level("DEBUG"):
        assert stored_tiles._slide(str(cut), [(2220, 2967)], [1.0]) is None  # OpenSlide reports the damage
    assert not [r for r in caplog.records if r.name == "tifffile"]
