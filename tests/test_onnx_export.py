"""ONNX export: the folder, parity with torch through the same embed path, the int8 gate, named errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image

import h0mini
from h0mini.cli import main
from h0mini.constants import MEAN, NUM_PREFIX_TOKENS, STD
from h0mini.errors import ExportValidationError, IncompatibleCheckpointError, ModelNotFoundError, OutputNotWritableError
from h0mini import export as export_module
from h0mini.export import INT8_MEAN_COSINE, INT8_MIN_COSINE, export_onnx, split_held_out
from h0mini.model import file_sha256
from h0mini.onnx_model import CONFIG_FILE, MODEL_FILE, OnnxModel
from helpers import EXAMPLE_TILES, make_model, random_model, write_checkpoint

TILES = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLE_TILES])


def torch_embed(model, tiles=TILES, **kwargs):
    return h0mini.embed_tiles(tiles, model, precision="fp32", device="cpu", progress=False, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """h0mini_test loaded from a checkpoint folder (so it has provenance), and its fp32 export."""
    root = tmp_path_factory.mktemp("onnx")
    write_checkpoint(root / "ckpt")
    model = h0mini.load_model(root / "ckpt")
    result = export_onnx(model, root / "export")
    return model, result.folder, result


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """A 2-block model of the full H0-mini width: int8 passes the gate on it, as on the full model."""
    model = random_model("h0_mini", depth=2)
    folder = tmp_path_factory.mktemp("int8") / "export"
    # The 7 shipped tiles hold out 2: the gate still judges, and says how few it had.
    with pytest.warns(UserWarning, match=r"the int8 gate judges on 2 held-out tiles \(of 7.*at least 48 tiles"):
        result = export_onnx(model, folder, quantize="int8")
    return model, folder, result


def test_export_folder_describes_the_model_for_use_without_h0mini(tiny):
    model, folder, result = tiny
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_FILE, MODEL_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["input"]["shape"] == ["batch", 3, 224, 224]
    assert config["preprocessing"]["mean"] == pytest.approx(MEAN) and config["preprocessing"]["std"] == pytest.approx(STD)
    assert config["preprocessing"]["interpolation"] == "bicubic" and config["preprocessing"]["crop_pct"] == 1.0
    assert config["output"]["shape"] == ["batch", NUM_PREFIX_TOKENS + 256, model.num_features]
    assert config["output"]["tokens"] == {"cls": 0, "registers": [1, 5], "patches": [5, 261], "patch_grid": [16, 16],
                                          "patch_order": "row-major"}
    assert config["source"]["weights_sha256"] == model.h0mini_weights.sha256
    assert config["source"]["arch"] == "h0mini_test"
    assert config["validation"]["fp32"]["max_rel_token_diff"] < 1e-4
    assert result.fp32.min_cosine["cls"] > 0.99999
    readme = (folder / "README.md").read_text()
    assert str(list(MEAN)) in readme and "tokens[:, 5:].mean(1)" in readme
    graph = onnx.load(str(folder / MODEL_FILE))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


def test_onnx_folder_embeds_like_torch_through_the_same_api(tiny):
    model, folder, _ = tiny
    onnx_model = h0mini.load_model(folder)
    assert isinstance(onnx_model, OnnxModel)
    for output in ("cls+mean", "cls", "patch_tokens"):
        np.testing.assert_allclose(h0mini.embed_tiles(TILES, folder, embedding=output, progress=False),
                                   torch_embed(model, embedding=output), atol=1e-4)
    one = h0mini.embed_tiles(TILES[0], onnx_model, progress=False)
    assert one.shape == (2 * model.num_features,)


def test_dynamic_batch_gives_the_same_rows_at_every_batch_size(tiny):
    _, folder, _ = tiny
    onnx_model = h0mini.load_model(folder / MODEL_FILE)
    rows = [h0mini.embed_tiles(TILES, onnx_model, batch_size=b, progress=False) for b in (1, 3, 8)]
    np.testing.assert_allclose(rows[1], rows[0], atol=1e-5)
    np.testing.assert_allclose(rows[2], rows[0], atol=1e-5)


def test_provenance_names_the_onnx_file_and_the_source_weights(tiny):
    model, folder, _ = tiny
    weights = h0mini.load_model(folder).h0mini_weights.as_dict()
    assert weights["weights_file"] == MODEL_FILE
    assert weights["weights_sha256"] == file_sha256(folder / MODEL_FILE)
    assert weights["arch"] == "h0mini_test-onnx-fp32"


def test_embed_cli_with_an_export_folder_writes_resumes_and_matches_torch(tiny, tmp_path, capsys):
    model, folder, _ = tiny
    out = tmp_path / "f.h5"
    tiles = [str(p) for p in EXAMPLE_TILES]
    assert main(["embed", *tiles, "-o", str(out), "--weights", str(folder)]) == 0
    assert "7 embedded" in capsys.readouterr().out
    assert main(["embed", *tiles, "-o", str(out), "--weights", str(folder)]) == 0
    assert "7 reused" in capsys.readouterr().out
    import h5py

    with h5py.File(out) as f:
        np.testing.assert_allclose(f["features"][:], torch_embed(model, [str(p) for p in EXAMPLE_TILES]), atol=1e-4)
        assert f.attrs["precision"] == "onnxruntime-fp32"


def test_torch_only_settings_are_refused_with_an_onnx_model(tiny):
    _, folder, _ = tiny
    with pytest.raises(ValueError, match="precision is fixed"):
        h0mini.embed_tiles(TILES, folder, precision="bf16", progress=False)
    with pytest.raises(ValueError, match="compile=True"):
        h0mini.embed_tiles(TILES, folder, compile=True, progress=False)
    with pytest.raises(ValueError, match="fixed input size"):
        h0mini.embed_tiles(TILES, folder, input_size=112, progress=False)


def test_corrupt_missing_or_foreign_onnx_files_give_named_errors(tiny, tmp_path):
    _, folder, _ = tiny
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / MODEL_FILE).write_bytes((folder / MODEL_FILE).read_bytes()[:5000])
    with pytest.raises(IncompatibleCheckpointError, match="corrupt"):
        h0mini.load_model(corrupt)

    lone = tmp_path / "lone" / MODEL_FILE
    lone.parent.mkdir()
    shutil.copy(folder / MODEL_FILE, lone)
    with pytest.raises(ModelNotFoundError, match=CONFIG_FILE):
        h0mini.load_model(lone)

    other = tmp_path / "other"
    export_onnx(random_model("h0mini_test", embed_dim=96), other, calibration=TILES[:2])
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    shutil.copy(other / MODEL_FILE, swapped / MODEL_FILE)
    with pytest.raises(IncompatibleCheckpointError, match="does not match"):
        h0mini.load_model(swapped)


def test_export_refuses_a_non_empty_output_folder(tiny, tmp_path):
    model, _, _ = tiny
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputNotWritableError, match="not an empty folder"):
        export_onnx(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_int8_passes_the_gate_and_is_batch_invariant(int8_export):
    model, folder, result = int8_export
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["precision"] == "int8" and result.precision == "int8"
    gate = config["validation"]["int8"]
    calibration, held_out = split_held_out(len(EXAMPLE_TILES))
    assert gate["tiles"] == len(held_out) and gate["calibration_tiles"] == len(calibration)
    assert gate["min_cosine"]["cls"] >= INT8_MIN_COSINE and gate["mean_cosine"]["cls"] >= INT8_MEAN_COSINE
    onnx_model = h0mini.load_model(folder)
    batched = h0mini.embed_tiles(TILES, onnx_model, batch_size=8, progress=False)
    alone = h0mini.embed_tiles(TILES, onnx_model, batch_size=1, progress=False)
    np.testing.assert_allclose(alone, batched, atol=1e-5)
    ops = {node.op_type for node in onnx.load(str(folder / MODEL_FILE)).graph.node}
    assert "DequantizeLinear" in ops and "QuantizeLinear" in ops  # static QDQ, not dynamic int8
    assert "DynamicQuantizeLinear" not in ops


def test_the_gate_refuses_a_broken_quantisation_and_writes_nothing(int8_export, tmp_path, monkeypatch):
    model, _, _ = int8_export
    real = export_module.quantize_static_qdq

    def broken(source, target, calibration, keep_float):  # calibrated on black tiles: activation ranges wrong
        real(source, target, np.zeros_like(calibration), keep_float)

    monkeypatch.setattr(export_module, "quantize_static_qdq", broken)
    with pytest.raises(ExportValidationError, match="int8 (min|mean) CLS cosine") as caught:
        export_onnx(model, tmp_path / "int8", quantize="int8")
    assert [f.split("]")[0] for f in caught.value.failed] == ["[linear layers kept float: none",
                                                              "[linear layers kept float: mlp_output"]
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind


def test_export_cli_validates_prints_and_refuses_without_traceback(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt")
    assert main(["export", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "ckpt"), "--max-tiles", "3"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime fp32 vs torch fp32 on 3 tiles" in printed and "fp32 ONNX export" in printed
    assert main(["export", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "ckpt")]) == 1
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_h0_mini_exports_and_matches_torch(tmp_path):
    model = make_model("h0_mini")
    result = export_onnx(model, tmp_path / "export", calibration=TILES[:2])
    assert result.fp32.max_rel_token_diff < 1e-4 and result.fp32.min_cosine["cls+mean"] > 0.99999
    config = json.loads((tmp_path / "export" / CONFIG_FILE).read_text())
    assert config["output"]["shape"] == ["batch", 261, 768]
    rows = h0mini.embed_tiles(TILES[:2], tmp_path / "export", progress=False)
    np.testing.assert_allclose(rows, torch_embed(model, TILES[:2]), atol=1e-4)


def test_the_mlp_output_projections_are_found_once_per_block(tiny):
    model, folder, _ = tiny
    names = export_module.mlp_output_projections(folder / MODEL_FILE)
    assert len(names) == len(model.blocks)


def test_an_export_of_demo_weights_keeps_their_label(tmp_path):
    from h0mini.checkpoint_io import write_hub_checkpoint
    from h0mini.constants import DEMO_WEIGHTS_LABEL

    write_hub_checkpoint(tmp_path / "demo", make_model("h0mini_test", 0), "h0mini_test", warning=DEMO_WEIGHTS_LABEL)
    with pytest.warns(UserWarning, match=DEMO_WEIGHTS_LABEL) as caught:
        model = h0mini.load_model(tmp_path / "demo")
    assert caught[0].filename == __file__  # the warning points at the caller
    export_onnx(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / CONFIG_FILE).read_text())["source"]["warning"] == DEMO_WEIGHTS_LABEL
    with pytest.warns(UserWarning, match=DEMO_WEIGHTS_LABEL) as caught:
        exported = h0mini.load_model(tmp_path / "export")
    assert caught[0].filename == __file__
    assert exported.h0mini_weights.as_dict()["warning"] == DEMO_WEIGHTS_LABEL  # and so every output's provenance


def test_int8_export_leaves_the_callers_logging_alone(tmp_path):
    """ORT's quantiser logs through the root logger, which would configure it (and print a hint) as a side effect."""
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import logging, sys, tempfile\n"
            "from helpers import random_model\n"
            "from h0mini.errors import ExportValidationError\n"
            "from h0mini.export import export_onnx\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    try:\n"
            "        export_onnx(random_model('h0mini_test'), d + '/e', quantize='int8')\n"
            "    except ExportValidationError:\n"
            "        pass  # the gate may refuse a tiny random model; quantisation ran either way\n"
            "print(len(logging.getLogger().handlers))\n")
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "0"  # no handler left on the root logger
    assert "pre-processing" not in result.stderr
