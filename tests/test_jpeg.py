"""jpeg_decode="device": JPEG tiles decoded next to the model, with the CPU path's numbers and errors.

On a CPU-only machine the "device" is the CPU and torchvision decodes with libjpeg-turbo, as
Pillow does: the pixels, hence the embeddings, must be identical. The CUDA test (nvJPEG) checks
closeness only: nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a level here and there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import h0mini
import h0mini.embed
import h0mini.jpeg
from h0mini.errors import InvalidTileError
from helpers import EXAMPLE_TILES, make_model


PICK_DECODER = h0mini.jpeg.jpeg_decoder


@pytest.fixture(scope="module")
def tiny():
    return make_model("h0mini_test")


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """JPEGs at 224 px (the device path), one at 300 px (resized: Pillow), a grayscale JPEG and a PNG."""
    folder = tmp_path_factory.mktemp("jpegs")
    for i, path in enumerate(EXAMPLE_TILES[:5]):
        Image.open(path).convert("RGB").save(folder / f"a{i}.jpg", quality=90)
    Image.open(EXAMPLE_TILES[5]).convert("RGB").resize((300, 300)).save(folder / "b_large.jpg", quality=90)
    Image.open(EXAMPLE_TILES[6]).convert("L").save(folder / "c_gray.jpg", quality=90)
    Image.open(EXAMPLE_TILES[0]).convert("RGB").save(folder / "d.png")
    return folder


@pytest.fixture(params=sorted(h0mini.jpeg.BACKENDS), autouse=True)
def backend(request, monkeypatch):
    """Every test runs with each decoder library that is installed."""
    decoder = h0mini.jpeg.BACKENDS[request.param]()
    if decoder is None:
        pytest.skip(f"{request.param} is not installed")
    monkeypatch.setattr(h0mini.jpeg, "jpeg_decoder", lambda: decoder)
    return request.param


@pytest.fixture
def device_decodes(monkeypatch):
    """Count the tiles handed to the device decoder (it runs in the main process)."""
    counted = []
    original = h0mini.embed.decode_on_device

    def counting(encoded, device):
        counted.extend(item.path for item in encoded)
        return original(encoded, device)

    monkeypatch.setattr(h0mini.embed, "decode_on_device", counting)
    return counted


@pytest.mark.parametrize("workers", [0, 1])
def test_device_decoding_gives_the_cpu_paths_numbers(tiny, jpeg_folder, device_decodes, workers):
    cpu = h0mini.embed_tiles(jpeg_folder, tiny, precision="fp32", batch_size=3, num_workers=workers)
    device = h0mini.embed_tiles(jpeg_folder, tiny, precision="fp32", batch_size=3, num_workers=workers,
                                jpeg_decode="device")
    np.testing.assert_array_equal(device, cpu)
    names = sorted(p.rsplit("/", 1)[-1] for p in device_decodes)
    assert names == ["a0.jpg", "a1.jpg", "a2.jpg", "a3.jpg", "a4.jpg", "c_gray.jpg"]  # not the 300 px one, not the PNG


def test_a_jpeg_with_an_exif_rotation_stays_on_the_pillow_path(tiny, tmp_path, device_decodes):
    """torchcodec would rotate it, Pillow (h0mini's CPU path) does not: one tile, one answer."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.open(EXAMPLE_TILES[0]).convert("RGB").save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    Image.open(EXAMPLE_TILES[1]).convert("RGB").save(tmp_path / "plain.jpg", quality=90)
    cpu = h0mini.embed_tiles(tmp_path, tiny, precision="fp32", num_workers=0)
    device = h0mini.embed_tiles(tmp_path, tiny, precision="fp32", num_workers=0, jpeg_decode="device")
    np.testing.assert_array_equal(device, cpu)
    assert [p.rsplit("/", 1)[-1] for p in device_decodes] == ["plain.jpg"]


def truncated_copy(source, target):
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # header intact: only the decoder can tell


def test_a_jpeg_the_decoder_rejects_is_named_like_on_the_cpu_path(tiny, jpeg_folder, tmp_path, device_decodes):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("a0.jpg", "a1.jpg", "a2.jpg"):
        (folder / name).write_bytes((jpeg_folder / name).read_bytes())
    truncated_copy(jpeg_folder / "a3.jpg", folder / "a0b_truncated.jpg")  # index 1 in sorted order

    with pytest.raises(InvalidTileError) as caught:
        h0mini.embed_tiles(folder, tiny, precision="fp32", batch_size=4, jpeg_decode="device")
    assert caught.value.index == 1 and caught.value.source.endswith("a0b_truncated.jpg")
    assert "truncated" in str(caught.value)
    assert any(p.endswith("a0b_truncated.jpg") for p in device_decodes)  # it did reach the device decoder

    with pytest.warns(h0mini.SkippedTilesWarning) as warned:
        device = h0mini.embed_tiles(folder, tiny, precision="fp32", batch_size=4, jpeg_decode="device", on_error="skip")
    with pytest.warns(h0mini.SkippedTilesWarning):
        cpu = h0mini.embed_tiles(folder, tiny, precision="fp32", batch_size=4, on_error="skip")
    np.testing.assert_array_equal(device, cpu)
    assert device.shape[0] == 3
    assert [s.index for s in warned[0].message.skipped] == [1]


def test_one_bad_file_does_not_send_the_whole_batch_to_pillow(tiny, jpeg_folder, tmp_path, monkeypatch):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("a0.jpg", "a1.jpg"):
        (folder / name).write_bytes((jpeg_folder / name).read_bytes())
    truncated_copy(jpeg_folder / "a2.jpg", folder / "a2.jpg")
    fallbacks = []
    original = h0mini.embed._Prepare.__call__

    def counting(self, index, item):
        fallbacks.append(index)
        return original(self, index, item)

    monkeypatch.setattr(h0mini.embed._Prepare, "__call__", counting)
    with pytest.warns(h0mini.SkippedTilesWarning):
        h0mini.embed_tiles(folder, tiny, batch_size=3, num_workers=0, jpeg_decode="device", on_error="skip")
    assert fallbacks.count(2) == 2  # read as bytes, then decoded by Pillow after the device refused it
    assert fallbacks.count(0) == fallbacks.count(1) == 1


def test_jpeg_decode_must_be_known(tiny):
    with pytest.raises(ValueError, match="jpeg_decode must be one of"):
        h0mini.embed_tiles(np.zeros((224, 224, 3), np.uint8), tiny, jpeg_decode="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_stays_close_to_pillow(jpeg_folder):
    """nvJPEG pixels differ from libjpeg's by about one level; embeddings stay at cosine > 0.9999."""
    model = make_model("h0mini_test").cuda()
    cpu = h0mini.embed_tiles(jpeg_folder, model, precision="fp32")
    gpu = h0mini.embed_tiles(jpeg_folder, model, precision="fp32", jpeg_decode="device")
    cosine = (cpu * gpu).sum(-1) / np.linalg.norm(cpu, axis=-1) / np.linalg.norm(gpu, axis=-1)
    assert cosine.min() > 0.9999


def test_without_a_decoder_library_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(h0mini.jpeg, "BACKENDS", {"torchcodec": lambda: None, "torchvision": lambda: None})
    with pytest.raises(ImportError, match=r"h0mini\[jpeg\]"):
        PICK_DECODER.__wrapped__()  # uncached: the fixture above replaced the module's choice
