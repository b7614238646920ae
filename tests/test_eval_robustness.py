"""Tile perturbations, the robustness report folder and ``h0mini robustness``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from h0mini.cli import main  # noqa: E402
from h0mini.errors import EvaluationInputError, InvalidTileError  # noqa: E402
from h0mini.eval.perturb import PERTURBATIONS, hed_stain, hed_to_rgb, perturb, rgb_to_hed  # noqa: E402
from h0mini.eval.report import load_tiles, robustness_report  # noqa: E402

from helpers import EXAMPLE_TILES, ROOT, make_model, slide_tiles, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiles():
    return [tile for _, tile in slide_tiles()[:8]]


def tiny_embed_fn(seed=0):
    """An embed_fn on the tiny test model: timm's eval transform, then the CLS token."""
    from timm.data import create_transform, resolve_data_config

    model = make_model(seed=seed)
    transform = create_transform(**resolve_data_config({}, model=model))

    def embed(images):
        batch = torch.stack([transform(image) for image in images])
        with torch.inference_mode():
            return model.forward_features(batch)[:, 0].numpy()

    return embed


# --- perturbations ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_strength_zero_is_exact_identity_and_strong_changes(tiles, name):
    tile = tiles[0]
    assert np.array_equal(perturb(tile, name, 0.0), tile)
    strongest = max(PERTURBATIONS[name].strengths)
    changed = perturb(tile, name, strongest)
    assert changed.shape == tile.shape and changed.dtype == np.uint8
    assert np.abs(changed.astype(int) - tile).mean() > 2.0


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_graded_and_deterministic(tiles, name):
    tile = tiles[1]
    strengths = PERTURBATIONS[name].strengths
    changes = [np.abs(perturb(tile, name, s, seed=3).astype(int) - tile).mean() for s in strengths]
    assert changes[0] == 0
    assert all(later >= earlier - 0.05 for earlier, later in zip(changes, changes[1:])), changes
    assert changes[-1] > changes[1]
    assert np.array_equal(perturb(tile, name, strengths[-1], seed=3), perturb(tile, name, strengths[-1], seed=3))


def test_seed_changes_random_directions():
    params = {seed: PERTURBATIONS["stain"].params(0.5, seed=seed) for seed in range(4)}
    assert len({p["alpha"] for p in params.values()}) == 4
    assert len({p["beta"] for p in params.values()}) == 4
    assert PERTURBATIONS["stain"].params(0.5, seed=1) == PERTURBATIONS["stain"].params(0.5, seed=1)
    assert PERTURBATIONS["stain"].params(0.0, seed=1) == {"alpha": (1.0, 1.0, 1.0), "beta": (0.0, 0.0, 0.0)}


@pytest.mark.parametrize("strength", [0.1, 0.35, 0.5, 1.0])
def test_stain_strength_sets_the_size_and_the_seed_only_the_direction(strength):
    from h0mini.eval.perturb import STAIN_SHIFT_SCALE

    for seed in range(20):
        p = PERTURBATIONS["stain"].params(strength, seed=seed)
        assert p["alpha"][2] == 1.0 and p["beta"][2] == 0.0  # DAB is left alone
        assert max(abs(a - 1.0) for a in p["alpha"][:2]) == pytest.approx(strength), seed
        assert max(abs(b) for b in p["beta"][:2]) == pytest.approx(STAIN_SHIFT_SCALE * strength), seed


def test_hed_round_trip_is_exact_without_shortcut():
    # Every 4th level of each channel plus the extremes: 66^3 colours through RGB -> HED -> RGB.
    levels = np.unique(np.concatenate([np.arange(0, 256, 4), [1, 254, 255]])).astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(len(levels), -1, 3)
    assert np.array_equal(hed_to_rgb(rgb_to_hed(grid)), grid)
    assert np.array_equal(hed_stain(grid, alpha=(1, 1, 1), beta=(0, 0, 0)), grid)


def test_hed_unmixes_the_stains(tiles):
    hed = rgb_to_hed(tiles[0])
    # H&E tissue: haematoxylin and eosin dominate; stronger haematoxylin darkens the red channel.
    assert hed[..., 0].mean() > 0.05 and hed[..., 1].mean() > 0.05
    darker = hed_stain(tiles[0], alpha=(1.5, 1.0, 1.0), beta=(0, 0, 0))
    assert darker[..., 0].astype(int).mean() < tiles[0][..., 0].astype(int).mean() - 3


def test_pil_in_pil_out_and_errors(tiles):
    image = Image.fromarray(tiles[0])
    out = perturb(image, "jpeg", 0.5)
    assert isinstance(out, Image.Image) and out.size == image.size
    with pytest.raises(EvaluationInputError, match="strength must be in"):
        perturb(tiles[0], "blur", 1.5)
    with pytest.raises(EvaluationInputError, match="unknown perturbation 'sepia'"):
        perturb(tiles[0], "sepia", 0.1)
    with pytest.raises(EvaluationInputError, match="uint8 RGB"):
        perturb(tiles[0].astype(np.float32), "blur", 0.1)


# --- the report -------------------------------------------------------------------------------


def test_report_folder(tmp_path, tiles):
    chosen = {"stain": (0.2, 0.5), "jpeg": (1.0,), "blur": (0.5, 1.0)}
    report = robustness_report(
        tiles, {"tiny-a": tiny_embed_fn(0), "tiny-b": tiny_embed_fn(1)}, tmp_path / "report", perturbations=chosen, n_examples=1
    )
    table = report.table
    assert len(table) == 2 * (3 + 2 + 3)  # models x (strength 0 + chosen strengths)
    identity = table[table["strength"] == 0]
    assert np.allclose(identity["cosine_similarity"], 1.0, atol=1e-6)
    assert (identity[["top_1_accuracy", "top_10_accuracy"]] == 1.0).all().all()
    strongest_blur = table[(table["perturbation"] == "blur") & (table["strength"] == 1.0)]
    assert (strongest_blur["cosine_similarity"] < 0.9999).all()
    assert set(table["n_tiles"]) == {8}

    csv = pd.read_csv(tmp_path / "report" / "metrics.csv")
    assert list(csv.columns[:4]) == ["model", "perturbation", "strength", "setting"]
    assert len(csv) == len(table)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| tiny-a | blur | blur sigma 2.00 px |" in markdown
    assert "![cosine_similarity](plots/cosine_similarity.png)" in markdown
    assert "JPEG quality 10" in markdown

    pngs = sorted((tmp_path / "report").rglob("*.png"))
    assert [p.relative_to(tmp_path / "report").as_posix() for p in pngs] == [
        "examples/tile_0.png",
        "plots/cosine_similarity.png",
        "plots/top_10_accuracy.png",
        "plots/top_1_accuracy.png",
        "plots/top_3_accuracy.png",
        "plots/top_5_accuracy.png",
    ]
    for png in pngs:
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG"
            width, height = image.size
            assert 400 <= width <= 2500 and 300 <= height <= 2500, (png.name, image.size)
            pixels = np.asarray(image.convert("RGB"))
            assert pixels.std() > 10  # not a blank canvas
    assert sorted(report.files) == sorted([*pngs, tmp_path / "report" / "metrics.csv", tmp_path / "report" / "report.md"])


def test_report_input_errors(tmp_path, tiles):
    fn = tiny_embed_fn()
    with pytest.raises(EvaluationInputError, match="top-10 accuracy needs at least 6 tiles"):
        robustness_report(tiles[:3], {"m": fn}, tmp_path / "r", perturbations=["blur"])
    with pytest.raises(EvaluationInputError, match=r"model 'broken': embed_fn returned shape \(3,\)"):
        robustness_report(tiles, {"broken": lambda images: np.zeros(3)}, tmp_path / "r", perturbations=["blur"])
    with pytest.raises(EvaluationInputError, match="model 'nan'"):
        robustness_report(tiles, {"nan": lambda images: np.full((len(images), 4), np.nan)}, tmp_path / "r", perturbations=["blur"])
    with pytest.raises(EvaluationInputError, match="models is empty"):
        robustness_report(tiles, {}, tmp_path / "r")
    with pytest.raises(EvaluationInputError, match="perturbation 'blur': strength must be in"):
        robustness_report(tiles, {"m": fn}, tmp_path / "r", perturbations={"blur": (2.0,)})


def test_load_tiles(tmp_path, tiles):
    images, names = load_tiles(ROOT / "examples" / "tiles")
    assert len(images) == len(EXAMPLE_TILES) and names == [p.name for p in EXAMPLE_TILES]
    images, names = load_tiles([str(EXAMPLE_TILES[0]), tiles[0], Image.fromarray(tiles[1])])
    assert names == [EXAMPLE_TILES[0].name, "tile_1", "tile_2"] and all(i.mode == "RGB" for i in images)
    assert len(load_tiles(str(ROOT / "examples" / "tiles" / "*.png"))[0]) == len(EXAMPLE_TILES)
    with pytest.raises(InvalidTileError, match="no such file"):
        load_tiles(tmp_path / "missing")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InvalidTileError, match="bad.png"):
        load_tiles(tmp_path / "bad.png")


def test_load_tiles_uses_the_package_decoding_rules(tmp_path):
    # Transparent pixels are glass: white, as h0mini.embed_tiles reads them, not the hidden colour.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:4, ..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    gray16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 16-bit mid-grey
    gray16.save(tmp_path / "gray16.png")
    images, names = load_tiles([tmp_path / "alpha.png", Image.fromarray(rgba, "RGBA"), tmp_path / "gray16.png"])
    for image in images[:2]:
        pixels = np.asarray(image)
        assert image.mode == "RGB"
        assert (pixels[:4] == (10, 20, 30)).all() and (pixels[4:] == 255).all()
    assert (np.asarray(images[2]) == 128).all()
    assert names[0] == "alpha.png"


# --- the command ------------------------------------------------------------------------------


def test_cli_two_models(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt")
    write_checkpoint(tmp_path / "other", seed=1)
    out = tmp_path / "report"
    argv = [
        "robustness", str(ROOT / "examples" / "tiles"), "-o", str(out),
        "--weights", str(tmp_path / "ckpt"), "--weights", str(tmp_path / "other"),
        "--perturbations", "stain,resample", "--device", "cpu", "--precision", "fp32", "--examples", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "ckpt" in stdout and "other" in stdout and "resample" in stdout
    assert f"report: {out / 'report.md'}" in stdout
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["model"]) == {"ckpt", "other"}
    assert set(table["perturbation"]) == {"stain", "resample"}
    assert (out / "plots" / "top_1_accuracy.png").is_file() and (out / "examples" / "tile_0.png").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main(["robustness", str(tmp_path / "nothing"), "-o", str(tmp_path / "r"), "--weights", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as usage:
        main(["robustness", str(ROOT / "examples" / "tiles"), "-o", str(tmp_path / "r"), "--perturbations", "sepia"])
    assert usage.value.code == 2
    assert "unknown perturbation" in capsys.readouterr().err


def test_import_h0mini_does_not_import_eval():
    code = "import sys, h0mini; bad = [m for m in ('h0mini.eval', 'pandas', 'matplotlib', 'sklearn') if m in sys.modules]; print(bad)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_max_tiles_decodes_only_the_tiles_it_uses(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i, (_, tile) in enumerate(slide_tiles()[:5]):
        Image.fromarray(tile).save(folder / f"tile_{i}.png")
    (folder / "zz_broken.png").write_bytes(b"not a png")  # sorted last: beyond --max-tiles
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        if str(fp).startswith(str(folder)):
            opened.append(Path(fp).name)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    write_checkpoint(tmp_path / "ckpt")
    argv = [
        "robustness", str(folder), "-o", str(tmp_path / "report"), "--weights", str(tmp_path / "ckpt"),
        "--perturbations", "blur", "--top-k", "1,3", "--max-tiles", "3", "--examples", "0",
        "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "(3 tiles)" in capsys.readouterr().out
    assert sorted(opened) == ["tile_0.png", "tile_1.png", "tile_2.png"]
    assert set(pd.read_csv(tmp_path / "report" / "metrics.csv")["n_tiles"]) == {3}
