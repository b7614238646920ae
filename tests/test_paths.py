"""#22: the fallbacks and side paths give the main path's numbers and leave the caller's objects alone."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import h0mini
from h0mini import backend as backend_module
from h0mini import embed as embed_module
from h0mini import runtime
from h0mini.embed import TileEmbedder
from h0mini.errors import InvalidArgumentError
from h0mini.preprocess import Preprocessing
from helpers import EXAMPLE_TILES, ROOT, make_model, write_checkpoint


@pytest.fixture(scope="module")
def tiny():
    return make_model("h0mini_test")


@pytest.fixture(scope="module")
def float_tiles():
    """Real H&E tiles as float tensors in [0, 1]: the input the in-place normalisation corrupted."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLE_TILES[:6]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


# -- 1. the CUDA out-of-memory fallback -------------------------------------------------------------


def test_an_out_of_memory_error_once_splits_the_batch_and_keeps_the_numbers(tiny, float_tiles, caplog):
    """The retry runs on the pixels as they came, not on a batch normalised once already. fp32 on the
    CPU, batches of 6 then 3: only summation order differs, so 1e-5 (the corruption was 0.37)."""
    import copy

    reference = h0mini.embed_tiles(float_tiles, tiny, precision="fp32", batch_size=6)
    model = copy.deepcopy(tiny)
    real, failed = model.forward_features, []

    def out_of_memory_once(x):
        if not failed:
            failed.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x)

    model.forward_features = out_of_memory_once
    with caplog.at_level(logging.WARNING, logger="h0mini"):
        got = h0mini.embed_tiles(float_tiles, model, precision="fp32", batch_size=6)
    assert failed == [6] and "batches of 3 tiles" in caplog.text
    assert np.abs(got - reference).max() < 1e-5


def test_normalize_leaves_its_input_alone(tiny, float_tiles):
    prep = Preprocessing.from_model(tiny)
    batch = float_tiles.clone()
    prep.normalize(batch)
    assert torch.equal(batch, float_tiles)


# -- 2. the caller's model ----------------------------------------------------------------------------


def test_a_model_in_training_stays_in_training_and_is_embedded_in_eval_mode(pil_tiles):
    model = make_model("h0mini_test")
    expected = h0mini.embed_tiles(pil_tiles, model, precision="fp32")
    model.pos_drop = torch.nn.Dropout(0.5)  # in training mode this would change every embedding
    model.train()
    got = h0mini.embed_tiles(pil_tiles, model, precision="fp32")
    assert model.training and all(m.training for m in model.modules())
    np.testing.assert_array_equal(got, expected)


def test_device_auto_leaves_a_passed_model_where_it_is(tiny, pil_tiles, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "auto" would pick CUDA for weights to load
    embedder = TileEmbedder(tiny, precision="fp32")
    assert embedder.device.type == "cpu" and next(tiny.parameters()).device.type == "cpu"


def test_the_default_model_follows_h0mini_weights_and_only_one_is_kept(tmp_path, monkeypatch, pil_tiles):
    write_checkpoint(tmp_path / "a", seed=0)
    write_checkpoint(tmp_path / "b", seed=1)
    embed_module._cached_model.clear()
    monkeypatch.setenv("H0MINI_WEIGHTS", str(tmp_path / "a"))
    first = TileEmbedder(device="cpu").model
    assert TileEmbedder(device="cpu").model is first  # loaded once
    gone = weakref.ref(first)
    a = h0mini.embed_tiles(pil_tiles[0], device="cpu")
    del first
    monkeypatch.setenv("H0MINI_WEIGHTS", str(tmp_path / "b"))
    b = h0mini.embed_tiles(pil_tiles[0], device="cpu")
    gc.collect()
    assert not np.allclose(a, b) and gone() is None  # the new weights, and the old model freed
    embed_module._cached_model.clear()


def test_a_rewritten_weights_file_is_loaded_again(tmp_path, pil_tiles):
    embed_module._cached_model.clear()
    write_checkpoint(tmp_path / "w", seed=0)
    a = h0mini.embed_tiles(pil_tiles[0], tmp_path / "w" / "model.safetensors", device="cpu")
    write_checkpoint(tmp_path / "w", seed=5)
    os.utime(tmp_path / "w" / "model.safetensors", ns=(1, 1))  # a different time even on a coarse clock
    b = h0mini.embed_tiles(pil_tiles[0], tmp_path / "w" / "model.safetensors", device="cpu")
    assert not np.allclose(a, b)
    embed_module._cached_model.clear()


@pytest.fixture(scope="module")
def pil_tiles():
    return [Image.open(p).convert("RGB") for p in EXAMPLE_TILES[:3]]


# -- 4. only bad tiles are skipped ----------------------------------------------------------------------


def test_a_bug_in_tile_preparation_raises_even_with_skip(tiny, pil_tiles, monkeypatch):
    def broken(self, item):
        raise KeyError("a bug, not a bad tile")

    monkeypatch.setattr(Preprocessing, "prepare_noting", broken)
    with pytest.raises(KeyError, match="a bug"):
        h0mini.embed_tiles(pil_tiles, tiny, on_error="skip")


def test_a_truncated_image_is_still_a_skipped_tile(tiny, tmp_path):
    good = tmp_path / "good.png"
    Image.open(EXAMPLE_TILES[0]).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.warns(h0mini.SkippedTilesWarning, match="bad.png"):
        got = h0mini.embed_tiles([good, bad], tiny, on_error="skip")
    assert got.shape[0] == 1


# -- 5. the precision is said ---------------------------------------------------------------------------


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_on_the_cpu_follows_the_processor_and_is_said(tiny, native_bf16, monkeypatch, caplog):
    monkeypatch.setattr(backend_module, "_LOGGED_PRECISIONS", set())
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: native_bf16)
    with caplog.at_level(logging.INFO, logger="h0mini"):
        first = TileEmbedder(tiny, device="cpu")
        TileEmbedder(tiny, device="cpu")
    expected = "bf16" if native_bf16 else "fp32"
    assert first.precision == expected
    lines = [r.getMessage() for r in caplog.records if "embedding on the CPU" in r.getMessage()]
    assert lines == [f"embedding on the CPU in {expected} (precision='auto': this CPU has "
                     f"{'native' if native_bf16 else 'no native'} bf16)"]


# -- 6. torch.compile stays private ---------------------------------------------------------------------


def test_compile_never_drops_the_callers_own_compiled_functions(pil_tiles, monkeypatch):
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")  # the caching is dynamo's, whatever the backend
    compiled_graphs = []

    def counting(graph, inputs):
        compiled_graphs.append(graph)
        return graph.forward

    user_step = torch.compile(lambda x: (x * 2).sum(), backend=counting)
    user_step(torch.ones(3))
    model = make_model("h0mini_test", seed=2)
    embedder = TileEmbedder(model, precision="fp32", compile=True)
    before = h0mini.embed_tiles(pil_tiles, model, precision="fp32")
    list(embedder.iter_batches(pil_tiles))
    with torch.no_grad():
        model.head_drop.p = 0.0
        model.norm.weight.mul_(2)  # frozen weights changed: h0mini compiles its graph again
    got = torch.cat([b.features["cls+mean"] for b in embedder.iter_batches(pil_tiles)]).numpy()
    user_step(torch.ones(3))
    assert len(compiled_graphs) == 1  # the caller's graph was kept
    assert not np.allclose(got, before)
    np.testing.assert_allclose(got, h0mini.embed_tiles(pil_tiles, model, precision="fp32"), atol=1e-5)


# -- 8. Ctrl-C in programs that are not the command ------------------------------------------------------


@pytest.mark.parametrize("layout", ["script", "folder"])
def test_a_program_named_h0mini_keeps_pythons_ctrl_c(layout, tmp_path):
    code = "import signal, h0mini\nprint(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    if layout == "script":
        program = tmp_path / "h0mini"
        program.write_text(code)
    else:
        program = tmp_path / "h0mini"
        program.mkdir()
        (program / "__main__.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.stdout.strip() == "True", result.stderr


# -- 9. argument errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call, argument, accepted", [
    (lambda m: TileEmbedder(m, precision="fp8"), "precision", "'bf16'"),
    (lambda m: TileEmbedder(m, device="gpu"), "device", "'cuda:N'"),
    (lambda m: TileEmbedder(m, input_size=15), "input_size", "multiple of 14"),
    (lambda m: TileEmbedder(42), "model", "load_model()"),
    (lambda m: h0mini.embed_tiles(np.zeros((224, 224, 3), np.uint8), m, return_dtype="float17"), "return_dtype",
     "float dtype"),
    (lambda m: h0mini.embed_tiles(np.zeros((224, 224, 3), np.uint8), m, on_error="ignore"), "on_error", "'skip'"),
])
def test_argument_errors_name_the_argument_and_what_it_accepts(tiny, call, argument, accepted):
    with pytest.raises(InvalidArgumentError) as caught:
        call(tiny)
    assert caught.value.argument == argument and accepted in caught.value.accepted
    assert argument in str(caught.value)


def test_load_model_dtype_errors_are_argument_errors(tmp_path):
    write_checkpoint(tmp_path / "w")
    with pytest.raises(InvalidArgumentError, match="dtype must be one of") as caught:
        h0mini.load_model(tmp_path / "w", dtype="int3")
    assert "half" in caught.value.accepted  # one table of names: load_model's dtype= and precision= alike


def test_a_wrong_model_type_is_still_a_type_error(tiny):
    with pytest.raises(TypeError):
        TileEmbedder(42)


# -- 11. smaller items ----------------------------------------------------------------------------------


def test_numpy_dtype_objects_are_accepted(tiny, pil_tiles):
    assert h0mini.embed_tiles(pil_tiles[0], tiny, return_dtype=np.float16).dtype == np.float16
    assert h0mini.embed_tiles(pil_tiles[0], tiny, return_dtype=np.dtype("f2")).dtype == np.float16
    assert h0mini.embed_tiles(pil_tiles[0], tiny, return_dtype=np.float16, return_tensors=True).dtype == torch.float16


def test_16_bit_grayscale_has_one_scale_whatever_its_content():
    from h0mini.tiles import to_rgb

    for mode in ("I", "I;16"):
        dtype = np.uint16 if mode == "I;16" else np.int32
        dark, bright = (Image.fromarray(np.full((4, 4), value, dtype)) for value in (200, 51400))
        assert dark.mode == bright.mode == mode
        assert np.asarray(to_rgb(dark)).max() == 1 and np.asarray(to_rgb(bright)).min() == 200, mode


def test_stopping_early_closes_a_generator_source(tiny):
    closed = []

    def tiles():
        try:
            for _ in range(40):
                yield np.zeros((224, 224, 3), np.uint8)
        finally:
            closed.append(True)

    source = tiles()  # the caller keeps a reference: only an explicit close runs its clean-up
    batches = TileEmbedder(tiny, embedding="cls", batch_size=2).iter_batches(source)
    next(batches)
    batches.close()
    assert closed == [True]
    assert not [t for t in __import__("threading").enumerate() if t.name == "h0mini-prefetch"]


def test_malloc_trim_runs_only_in_the_command(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(embed_module, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(embed_module, "TRIM_EVERY", 1)
    h0mini.embed_tiles([np.zeros((224, 224, 3), np.uint8)] * 4, tiny, batch_size=1)
    assert calls == []
    monkeypatch.setattr(embed_module, "started_as_command", lambda: True)
    h0mini.embed_tiles([np.zeros((224, 224, 3), np.uint8)] * 4, tiny, batch_size=1)
    assert len(calls) == 4


# -- 7. distillation numerics ---------------------------------------------------------------------------


def test_the_standardiser_gives_unit_spread_at_a_large_mean():
    from h0mini.distill.losses import TargetStandardizer

    torch.manual_seed(0)
    features = 300 + 0.05 * torch.randn(4096, 8)
    out = TargetStandardizer(8)(features)
    # 4096 rows: the sample std of a unit normal is within 3% of 1 (about 7 standard errors).
    assert torch.allclose(out.std(0), torch.ones(8), atol=0.03), out.std(0)
    assert out.mean(0).abs().max() < 0.01


def test_a_teacher_with_its_own_normalisation_sees_its_own_statistics(tmp_path):
    """Crops normalised for the student (H-optimus statistics) reach a teacher whose pretrained_cfg says
    ImageNet as ImageNet-normalised pixels: the same as normalising the raw crop with ImageNet's."""
    from h0mini.distill.config import load_config
    from h0mini.distill.meta_arch import Distiller

    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    seen = []

    class Teacher(torch.nn.Module):
        num_prefix_tokens = 1
        pretrained_cfg = {"mean": imagenet_mean, "std": imagenet_std}

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.patch_embed = type("P", (), {"patch_size": (14, 14)})()

        def forward_features(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 1 + 16, 8) * self.scale

    config = load_config(None, [f"output_dir={tmp_path}", "data.sources=[x]", "student.arch=h0mini_test",
                                "crops.global_size=56", "crops.local_size=28", "feature.projector_hidden_dim=0"])
    distiller = Distiller(config, make_model("h0mini_test"), Teacher(), torch.device("cpu"), teacher_dim=8)
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 56, 56)
    student_mean = torch.tensor(config.data.mean).view(1, 3, 1, 1)
    student_std = torch.tensor(config.data.std).view(1, 3, 1, 1)
    distiller._teacher_forward((raw - student_mean) / student_std)
    expected = (raw - torch.tensor(imagenet_mean).view(1, 3, 1, 1)) / torch.tensor(imagenet_std).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], expected, atol=1e-5)


# -- 3. one preprocessing rule for both loading paths ----------------------------------------------------


def test_a_config_without_crop_pct_gives_the_same_preprocessing_on_both_paths(tmp_path, point_hub_at, caplog):
    """The Hub's config.json rules on both paths (it is what the model card's hf-hub: loading reads); a key it
    lacks takes timm's default (crop_pct 0.875), and the difference from the built-in config is logged."""
    import timm

    from fake_hub import FakeHub, FakeRepo
    from helpers import checkpoint_files

    write_checkpoint(tmp_path / "full", arch="h0_mini")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    del config["pretrained_cfg"]["crop_pct"]
    (tmp_path / "full" / "config.json").write_text(json.dumps(config))
    with FakeHub() as server:
        server.repos["bioptimus/H0-mini"] = FakeRepo(files=checkpoint_files(tmp_path / "full"))
        point_hub_at(server.url)
        with caplog.at_level(logging.WARNING, logger="h0mini"):
            loaded = h0mini.load_model("bioptimus/H0-mini", device="cpu")
            created = timm.create_model("h0_mini", pretrained=True)
    assert loaded.pretrained_cfg["crop_pct"] == created.pretrained_cfg["crop_pct"] == 0.875
    assert Preprocessing.from_model(loaded).describe() == Preprocessing.from_model(created).describe()
    logged = [r.getMessage() for r in caplog.records if "crop_pct" in r.getMessage()]
    assert len(logged) == 2 and all("crop_pct 0.875 (built-in 1.0)" in m for m in logged), logged


def test_slide_and_output_argument_errors_are_argument_errors(tmp_path):
    from pathlib import Path

    from h0mini.writers import check_format
    from helpers import SLIDE

    for kwargs, argument in (({"mpp": -1.0}, "mpp"), ({"target_mpp": 0}, "target_mpp"), ({"overlap": -1}, "overlap"),
                             ({"min_tissue": 2}, "min_tissue")):
        with pytest.raises(InvalidArgumentError) as caught:
            h0mini.tile_slide(SLIDE, **kwargs)
        assert caught.value.argument == argument, kwargs
    for name, embedding in (("out.csv", "cls"), ("out.npy", "all"), ("out.parquet", "patch_tokens")):
        with pytest.raises(InvalidArgumentError) as caught:
            check_format(Path(tmp_path / name), embedding)
        assert caught.value.argument == "output_path"
