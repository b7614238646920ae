"""embed_tiles(): the model card's numbers, every input kind, order, outputs, and bad input."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import h0mini
from h0mini.embed import TileEmbedder
from h0mini.runtime import resolve_precision
from h0mini.errors import InvalidTileError
from helpers import EXAMPLE_TILES, make_model, slide_tiles, write_checkpoint


@pytest.fixture(scope="module")
def tiny():
    return make_model("h0mini_test")


@pytest.fixture(scope="module")
def pil_tiles():
    return [Image.open(p).convert("RGB") for p in EXAMPLE_TILES[:5]]


# The upstream values, typed out here rather than read from h0mini's config, so that a wrong constant
# or a config that drifts cannot agree with itself (REFERENCE: H-optimus normalisation, bicubic,
# crop_pct 1.0, 224 px).
UPSTREAM_MEAN = (0.707223, 0.578729, 0.703617)
UPSTREAM_STD = (0.211883, 0.230117, 0.177517)


def model_card_transform(size=224, crop_pct=1.0):
    """timm's eval transform for that config, spelled out: resize the shorter side to floor(size / crop_pct)
    (bicubic, PIL), centre crop, ToTensor, Normalize."""
    import math

    from torchvision import transforms as T

    return T.Compose([T.Resize(math.floor(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(UPSTREAM_MEAN, UPSTREAM_STD)])


def model_card(model, images, crop_pct=1.0):
    """The model card's recipe with the literal upstream preprocessing, then the forward, CLS + patch mean."""
    transform = model_card_transform(crop_pct=crop_pct)
    with torch.inference_mode():
        tokens = model(torch.stack([transform(im) for im in images]))
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1).numpy()


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# -- correctness ---------------------------------------------------------------------------------


def test_full_h0_mini_matches_the_model_card_on_real_tiles(pil_tiles):
    """Same weights, same 4 real H&E tiles, fp32: the only freedom is float summation order in the
    batched matmuls (same batch of 4 both ways), so agreement must be at float32 rounding level.
    1e-4 absolute on values of order 1 leaves room for a different BLAS blocking, nothing more."""
    model = make_model("h0_mini")
    # Two 224 px tiles, one of 256 px and one not square (300 x 250): the resize and crop too.
    tiles = [*pil_tiles[:2], pil_tiles[2].resize((256, 256), Image.Resampling.BILINEAR),
             pil_tiles[3].resize((300, 250), Image.Resampling.BILINEAR)]
    expected = model_card(model, tiles)
    got = h0mini.embed_tiles(tiles, model, precision="fp32", batch_size=4)
    assert got.shape == (4, 1536)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(expected).max() > 0.1  # the blocks do something (trained-like LayerScale)


def test_bf16_on_cpu_stays_close_to_fp32_on_real_tiles(tiny):
    tiles = [t for _, t in slide_tiles()[:8]]
    fp32 = h0mini.embed_tiles(tiles, tiny, precision="fp32")
    bf16 = h0mini.embed_tiles(tiles, tiny, precision="bf16")
    assert cosine(fp32, bf16).min() > 0.999


def test_explicit_precisions_and_bad_names():
    # What "auto" picks on each kind of CPU: tests/test_paths.py::test_auto_precision_on_the_cpu_follows_...
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("int3", torch.device("cpu"))


def test_other_tile_sizes_are_resized_as_the_model_card_does(tiny):
    big = Image.open(EXAMPLE_TILES[0]).convert("RGB").resize((300, 260), Image.BICUBIC)
    got = h0mini.embed_tiles(big, tiny, precision="fp32")
    assert np.abs(got - model_card(tiny, [big])[0]).max() < 1e-5


def test_native_size_gives_the_matching_patch_grid(tiny):
    tile = np.asarray(Image.open(EXAMPLE_TILES[0]).convert("RGB").resize((448, 448)))
    tokens = h0mini.embed_tiles(tile, tiny, embedding="patch_tokens", input_size="native")
    assert tokens.shape == (32 * 32, 48)
    with pytest.raises(InvalidTileError, match="multiples of 14"):
        h0mini.embed_tiles(np.zeros((100, 100, 3), np.uint8), tiny, input_size="native")


# -- inputs -------------------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_embeddings(tiny, pil_tiles, tmp_path):
    reference = h0mini.embed_tiles(pil_tiles, tiny, precision="fp32")
    arrays = np.stack([np.asarray(im) for im in pil_tiles])
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    paths = [str(p) for p in EXAMPLE_TILES[:5]]
    (tmp_path / "tiles.txt").write_text("\n".join(paths) + "\n")
    (tmp_path / "tiles.csv").write_text("path,x,y\n" + "\n".join(f"{p},0,0" for p in paths))

    class Tiles(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return pil_tiles[i], i  # (image, label) like torchvision datasets

    kinds = {
        "uint8 stack": arrays,
        "list of arrays": list(arrays),
        "uint8 tensor": tensors,
        "float tensor": tensors.float() / 255,
        "paths": paths,
        "glob": str(EXAMPLE_TILES[0].parent / "*.png"),
        "txt list": tmp_path / "tiles.txt",
        "csv list": tmp_path / "tiles.csv",
        "generator": (im for im in pil_tiles),
        "dataset": Tiles(),
    }
    for name, tiles in kinds.items():
        got = h0mini.embed_tiles(tiles, tiny, precision="fp32")
        got = got[:5]  # the glob matches all example tiles, sorted like paths
        assert np.abs(got - reference).max() < 1e-5, name
    folder = h0mini.embed_tiles(EXAMPLE_TILES[0].parent, tiny, precision="fp32")
    assert folder.shape == (len(EXAMPLE_TILES), 96)


def test_single_tile_gives_a_vector(tiny, pil_tiles):
    for single in (pil_tiles[0], np.asarray(pil_tiles[0]), str(EXAMPLE_TILES[0])):
        assert h0mini.embed_tiles(single, tiny).shape == (96,)
    assert h0mini.embed_tiles([pil_tiles[0]], tiny).shape == (1, 96)


def test_order_is_kept_across_workers_and_batches(tiny):
    paths = [str(p) for p in EXAMPLE_TILES] * 2
    one_by_one = np.stack([h0mini.embed_tiles(p, tiny, precision="fp32") for p in paths[:7]])
    got = h0mini.embed_tiles(paths, tiny, precision="fp32", batch_size=3, num_workers=2)
    assert np.abs(got[:7] - one_by_one).max() < 1e-5 and np.abs(got[7:] - one_by_one).max() < 1e-5


def test_a_generator_is_streamed_not_collected(tiny):
    """Memory stays bounded: the pipeline reads at most a few batches ahead of the model."""
    produced = []

    def tiles():
        for i in range(3000):
            produced.append(i)
            yield np.full((28, 28, 3), i % 251, np.uint8)

    embedder = TileEmbedder(tiny, embedding="cls", batch_size=64, input_size="native")
    seen = 0
    for batch in embedder.iter_batches(tiles()):
        seen += len(batch.indices)
        assert len(produced) - seen <= 64 * 4
    assert seen == 3000


def test_results_do_not_hold_the_token_tensors(tiny):
    """Each row owns its memory: a view of the CLS token would pin all 261 tokens per tile."""
    embedder = TileEmbedder(tiny, embedding="cls", batch_size=4)
    batch = next(embedder.iter_batches([np.zeros((224, 224, 3), np.uint8)] * 4))
    cls = batch.features["cls"]
    assert cls.untyped_storage().nbytes() == cls.numel() * cls.element_size()


# -- outputs ----------------------------------------------------------------------------------------


def test_output_modes_and_registers_never_in_the_mean(tiny, pil_tiles):
    everything = h0mini.embed_tiles(pil_tiles, tiny, embedding="all", precision="fp32")
    assert everything["cls"].shape == (5, 48)
    assert everything["registers"].shape == (5, 4, 48)
    assert everything["patch_tokens"].shape == (5, 256, 48)
    mean = h0mini.embed_tiles(pil_tiles, tiny, embedding="mean", precision="fp32")
    np.testing.assert_allclose(mean, everything["patch_tokens"].mean(1), atol=1e-6)
    with_registers = np.concatenate([everything["registers"], everything["patch_tokens"]], 1).mean(1)
    assert np.abs(mean - with_registers).max() > 1e-3
    both = h0mini.embed_tiles(pil_tiles, tiny, precision="fp32")
    np.testing.assert_allclose(both, np.concatenate([everything["cls"], mean], 1), atol=1e-6)
    cls = h0mini.embed_tiles(pil_tiles, tiny, embedding="cls", return_tensors=True)
    assert isinstance(cls, torch.Tensor) and cls.dtype == torch.float32
    assert h0mini.embed_tiles(pil_tiles, tiny, return_dtype="float16").dtype == np.float16


def test_default_model_is_loaded_once(monkeypatch, tmp_path, pil_tiles):
    write_checkpoint(tmp_path / "weights")
    monkeypatch.setenv("H0MINI_WEIGHTS", str(tmp_path / "weights"))
    from h0mini import embed as embed_module

    embed_module._cached_model.clear()
    calls = []
    real = embed_module.load_model
    monkeypatch.setattr(embed_module, "load_model", lambda w, **kw: calls.append(w) or real(w, **kw))
    first = h0mini.embed_tiles(pil_tiles[0])
    second = h0mini.embed_tiles(pil_tiles[0])
    assert calls == [None] and np.array_equal(first, second)
    embed_module._cached_model.clear()


# -- image modes --------------------------------------------------------------------------------------


def test_image_modes_follow_the_documented_rule(tiny, pil_tiles):
    rgb = pil_tiles[0]
    white = Image.new("RGB", rgb.size, (255, 255, 255))
    transparent = rgb.convert("RGBA")
    transparent.putalpha(0)
    gray = rgb.convert("L")
    gray16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert gray16.mode in ("I;16", "I")
    palette = rgb.convert("P")
    cases = [
        (transparent, white),  # alpha composited on white (glass)
        (rgb.convert("RGBA"), rgb),  # opaque alpha changes nothing
        (gray.convert("LA"), gray.convert("RGB")),
        (gray16, gray.convert("RGB")),  # 16-bit scaled to 8-bit, not clipped
        (palette, palette.convert("RGB")),
        (rgb.convert("CMYK"), rgb.convert("CMYK").convert("RGB")),
        (gray, gray.convert("RGB")),
    ]
    got = h0mini.embed_tiles([c for c, _ in cases], tiny, precision="fp32")
    expected = h0mini.embed_tiles([e for _, e in cases], tiny, precision="fp32")
    np.testing.assert_allclose(got, expected, atol=1e-5)


# -- bad input --------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path):
    good = [str(p) for p in EXAMPLE_TILES[:2]]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    data = EXAMPLE_TILES[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    return good, {
        "missing": str(tmp_path / "missing.png"),
        "empty": str(tmp_path / "empty.png"),
        "not an image": str(tmp_path / "notes.png"),
        "truncated": str(tmp_path / "cut.png"),
    }


def test_bad_files_are_named_with_index_and_path(tiny, bad_files):
    good, bad = bad_files
    messages = {"missing": "file not found", "empty": "file is empty", "not an image": "not an image",
                "truncated": "truncated"}
    for kind, path in bad.items():
        with pytest.raises(InvalidTileError) as info:
            h0mini.embed_tiles(good + [path], tiny, batch_size=2)
        assert info.value.index == 2 and info.value.source == path, kind
        assert messages[kind] in str(info.value) and path in str(info.value) and "tile 2" in str(info.value)
        assert info.value.partial.shape == (2, 96)  # the first batch was done and is not lost


def test_skip_embeds_the_rest_and_reports_what_was_skipped(tiny, bad_files):
    good, bad = bad_files
    tiles = [good[0], bad["missing"], good[1], bad["truncated"]]
    with pytest.warns(h0mini.SkippedTilesWarning) as record:
        got = h0mini.embed_tiles(tiles, tiny, on_error="skip", precision="fp32")
    expected = h0mini.embed_tiles(good, tiny, precision="fp32")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    skipped = record[0].message.skipped
    assert [(s.index, s.source) for s in skipped] == [(1, bad["missing"]), (3, bad["truncated"])]


@pytest.mark.parametrize(
    "tile, message",
    [
        (np.zeros((224, 224, 2), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((224, 224, 3), np.int64), "dtype int64"),
        (torch.full((3, 224, 224), float("nan")), "NaN"),
        (torch.full((3, 224, 224), 2.0), r"in \[0, 1\]"),
        (torch.zeros((224, 224, 3)), r"\(3, H, W\)"),
        (12, "int"),
    ],
)
def test_bad_arrays_are_named(tiny, tile, message):
    good = np.zeros((224, 224, 3), np.uint8)
    with pytest.raises(InvalidTileError, match=message) as info:
        h0mini.embed_tiles([good, tile], tiny)
    assert info.value.index == 1


def test_bad_arguments_say_what_is_valid(tiny):
    with pytest.raises(ValueError, match="embedding must be one of"):
        h0mini.embed_tiles(np.zeros((224, 224, 3), np.uint8), tiny, embedding="pooled")
    with pytest.raises(ValueError, match="on_error"):
        h0mini.embed_tiles(np.zeros((224, 224, 3), np.uint8), tiny, on_error="ignore")
    with pytest.raises(InvalidTileError, match="no such file, folder or pattern"):
        h0mini.embed_tiles("does/not/exist", tiny)


# -- GPU (skipped without CUDA) ----------------------------------------------------------------------


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
def test_gpu_uint8_path_equals_cpu_path(pil_tiles):
    model = make_model("h0_mini")
    cpu = h0mini.embed_tiles(pil_tiles, model, device="cpu", precision="fp32")
    cuda = h0mini.embed_tiles(pil_tiles, model, device="cuda", precision="fp32")
    assert cosine(cpu, cuda).min() > 0.99999


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_half_precision_parity(pil_tiles, precision):
    model = make_model("h0_mini")
    fp32 = h0mini.embed_tiles(pil_tiles, model, device="cuda", precision="fp32")
    half = h0mini.embed_tiles(pil_tiles, model, device="cuda", precision=precision)
    assert cosine(fp32, half).min() > 0.999


# -- edge cases found in review ---------------------------------------------------------------------


def test_crop_pct_below_one_resizes_even_224_px_tiles_as_the_model_card(pil_tiles):
    """timm resizes to floor(224 / crop_pct) then crops: never the identity when crop_pct < 1."""
    from h0mini.testing import random_model

    model = random_model(pretrained_cfg_overlay=dict(crop_pct=0.875))
    expected = model_card(model, pil_tiles[:2], crop_pct=0.875)
    for tiles in (pil_tiles[:2], np.stack([np.asarray(t) for t in pil_tiles[:2]])):
        got = h0mini.embed_tiles(tiles, model, precision="fp32")
        assert np.abs(got - expected).max() < 1e-5


def test_single_bad_tile_with_skip_raises_a_named_error(tiny):
    with pytest.raises(InvalidTileError, match="tile 0"):
        h0mini.embed_tiles(np.zeros((224, 224, 5), np.uint8), tiny, on_error="skip")


def test_a_single_grayscale_array_is_one_tile(tiny, pil_tiles):
    gray = np.asarray(pil_tiles[0].convert("L"))
    np.testing.assert_allclose(
        h0mini.embed_tiles(gray, tiny, precision="fp32"),
        h0mini.embed_tiles(pil_tiles[0].convert("L"), tiny, precision="fp32"),
        atol=1e-5,
    )


def test_a_model_loaded_in_bf16_runs_without_autocast(tiny, pil_tiles):
    import copy

    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    got = h0mini.embed_tiles(pil_tiles, bf16, precision="fp32")
    assert cosine(got, h0mini.embed_tiles(pil_tiles, tiny, precision="fp32")).min() > 0.99


def test_stopping_early_stops_the_prefetch_thread(tiny):
    import threading

    embedder = TileEmbedder(tiny, embedding="cls", batch_size=2)
    batches = embedder.iter_batches(np.zeros((224, 224, 3), np.uint8) for _ in range(40))
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "h0mini-prefetch"]


def test_numpy_has_no_bfloat16_and_says_so(tiny, pil_tiles):
    with pytest.raises(ValueError, match="return_tensors=True"):
        h0mini.embed_tiles(pil_tiles[0], tiny, dtype=torch.bfloat16)
    assert h0mini.embed_tiles(pil_tiles[0], tiny, dtype=torch.bfloat16, return_tensors=True).dtype == torch.bfloat16


def test_numpy_bfloat16_is_refused_even_where_ml_dtypes_registered_one(tiny, pil_tiles):
    pytest.importorskip("ml_dtypes")  # onnx imports it, and with it np.dtype("bfloat16") exists
    with pytest.raises(ValueError, match="return_tensors=True"):
        h0mini.embed_tiles(pil_tiles[0], tiny, dtype=torch.bfloat16)


def test_a_torch_dataset_is_decoded_by_dataloader_workers_in_order(tiny, pil_tiles):
    class Tiles(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return np.asarray(pil_tiles[i % 5]), i

    reference = h0mini.embed_tiles(pil_tiles, tiny, precision="fp32")
    got = h0mini.embed_tiles(Tiles(), tiny, precision="fp32", batch_size=3, num_workers=2)
    np.testing.assert_allclose(got, np.concatenate([reference, reference]), atol=1e-5)
