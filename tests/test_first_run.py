"""A new user's first ten minutes: demo weights, messages in the reader's words, options where typed."""

from __future__ import annotations

import json
import shutil
import warnings

import h5py
import numpy as np
import pytest
from PIL import Image

import h0mini
import h0mini.cli
from h0mini import errors
from h0mini.cli import main
from h0mini.constants import DEMO_WEIGHTS_LABEL, NUM_PARAMS
from h0mini.testing import write_demo_weights
from h0mini.tiles import SLIDE_SUFFIXES, expand_path

from helpers import EXAMPLE_TILES, SLIDE, make_model, write_checkpoint

REPO = "bioptimus/H0-mini"


def test_demo_weights_are_a_full_size_h0_mini_that_says_it_is_random(tmp_path):
    folder = write_demo_weights(tmp_path / "demo")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["h0mini_warning"] == DEMO_WEIGHTS_LABEL
    assert DEMO_WEIGHTS_LABEL in (folder / "README.md").read_text()
    with pytest.warns(UserWarning, match="random weights: for trying the pipeline, not for science"):
        model = h0mini.load_model(folder)
    assert model.h0mini_weights.arch == "h0_mini"
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS
    assert model.h0mini_weights.as_dict()["warning"] == DEMO_WEIGHTS_LABEL


def test_demo_weights_command_then_embed_records_the_label_in_the_provenance(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo-weights", str(folder), "--arch", "h0mini_test"]) == 0
    assert DEMO_WEIGHTS_LABEL in capsys.readouterr().out
    assert main(["demo-weights", str(folder)]) == 2  # a checkpoint is there: --force is needed
    assert "--force" in capsys.readouterr().err
    output = tmp_path / "out.h5"
    assert main(["embed", *map(str, EXAMPLE_TILES[:2]), "-o", str(output), "--weights", str(folder)]) == 0
    err = capsys.readouterr().err  # the notice as one plain line, no file path or source line
    assert f"warning: {folder}: {DEMO_WEIGHTS_LABEL}\n" in err and "UserWarning" not in err and ".py:" not in err
    with h5py.File(output) as f:
        assert json.loads(f.attrs["h0mini_provenance"])["warning"] == DEMO_WEIGHTS_LABEL


def test_offline_without_weights_speaks_python_to_python_callers():
    with pytest.raises(errors.WeightsNotCachedError) as info:
        h0mini.load_model(REPO, local_files_only=True)
    message = str(info.value)
    assert "local_files_only=True was passed" in message and "load_model('/path/to/H0-mini')" in message
    assert "h0mini.testing.write_demo_weights('DIR')" in message
    assert "--weights" not in message and "--offline" not in message


def test_offline_without_weights_speaks_options_to_command_line_users(tmp_path, capsys):
    code = main(["embed", str(EXAMPLE_TILES[0]), "-o", str(tmp_path / "x.h5"), "--offline"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--offline was passed" in err and "--weights /path/to/H0-mini" in err and "H0MINI_WEIGHTS" in err
    assert "h0mini demo-weights DIR" in err
    assert "load_model" not in err and "local_files_only" not in err


def test_a_wrong_weights_path_is_named_in_the_callers_words(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(errors.ModelNotFoundError, match=r"load_model\(weights=\.\.\.\)"):
        h0mini.load_model(missing)
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(tmp_path / "x.h5"), "--weights", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "--weights (or H0MINI_WEIGHTS) takes" in err and "weights=" not in err


@pytest.mark.parametrize("argv", [["-v", "card", "--weights", "X"], ["card", "--weights", "X", "-v"], ["card", "-vv", "--debug"]])
def test_output_options_are_accepted_before_or_after_the_command(argv):
    args = h0mini.cli.main_parser().parse_args(argv)
    assert args.verbose >= 1 and args.quiet is False


def test_output_options_default_when_not_given():
    args = h0mini.cli.main_parser().parse_args(["card"])
    assert (args.verbose, args.quiet, args.debug) == (0, False, False)


# --- odd inputs ----------------------------------------------------------------------------------



def cli_embed_error(tile, tmp_path, capsys) -> str:
    """``h0mini embed TILE`` on a tiny checkpoint, expected to fail: its stderr."""
    weights = tmp_path / "w"
    write_checkpoint(weights)
    assert main(["embed", str(tile), "-o", str(tmp_path / "x.h5"), "--weights", str(weights)]) == 1
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny():
    return make_model()


def test_one_list_of_slide_suffixes():
    from h0mini.wsi import discover

    assert discover.SLIDE_SUFFIXES is SLIDE_SUFFIXES  # the slide finder and the tile reader share one list
    assert {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi"} <= SLIDE_SUFFIXES


def test_a_slide_in_a_tile_folder_is_skipped_by_name(tmp_path):
    shutil.copy(EXAMPLE_TILES[0], tmp_path / "a.png")
    shutil.copy(SLIDE, tmp_path / "slide.svs")
    with pytest.warns(UserWarning, match=r"skipped 1 whole-slide file.*'slide.svs'.*embed_slides"):
        refs = expand_path(tmp_path)
    assert [r.path for r in refs] == [str(tmp_path / "a.png")]


def test_a_slide_passed_as_a_tile_is_refused_with_the_slide_command(tmp_path, tiny, capsys):
    with pytest.raises(errors.InvalidTileError, match=r"whole-slide file.*h0mini.embed_slides\(\)"):
        h0mini.embed_tiles([str(SLIDE)], model=tiny)
    err = cli_embed_error(SLIDE, tmp_path, capsys)
    assert "CMU-1-Small-Region.svs" in err and "h0mini embed-slides" in err
    assert not (tmp_path / "x.h5").exists()


def test_a_pyramidal_tiff_is_refused_and_a_plain_tiff_tile_is_embedded(tmp_path, tiny):
    pixels = np.asarray(Image.open(EXAMPLE_TILES[0]).convert("RGB"))
    big = Image.fromarray(np.tile(pixels, (4, 4, 1)))
    big.save(tmp_path / "pyramid.tif", save_all=True, append_images=[big.resize((448, 448)), big.resize((224, 224))])
    Image.fromarray(pixels).save(tmp_path / "tile.tif")
    with pytest.raises(errors.InvalidTileError, match=r"pyramid\.tif.*pyramidal TIFF \(896x896, 3 pages\).*embed_slides"):
        h0mini.embed_tiles([str(tmp_path / "pyramid.tif")], model=tiny)
    assert h0mini.embed_tiles(str(tmp_path / "tile.tif"), model=tiny).shape == (96,)


def test_a_tile_much_larger_than_the_input_warns_once_per_run_with_its_name_and_size(tmp_path, tiny):
    pixels = np.asarray(Image.open(EXAMPLE_TILES[0]).convert("RGB"))
    for i in range(3):
        Image.fromarray(np.tile(pixels, (5, 5, 1))[:1000, :1000]).save(tmp_path / f"big{i}.png")
    Image.fromarray(np.tile(pixels, (2, 2, 1))).save(tmp_path / "twice.png")  # 448 px: resized without a word
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h0mini.embed_tiles(str(tmp_path), model=tiny, batch_size=2, num_workers=0)
    messages = [str(w.message) for w in caught if "much larger" in str(w.message)]
    assert len(messages) == 1
    assert "big0.png" in messages[0] and "1000x1000 px" in messages[0] and "resized" in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h0mini.embed_tiles(str(tmp_path / "twice.png"), model=tiny)
    assert not [w for w in caught if "much larger" in str(w.message)]


# --- small edges ---------------------------------------------------------------------------------


def test_an_unknown_output_is_an_h0mini_error(tiny):
    with pytest.raises(errors.InvalidArgumentError, match=r"embedding must be one of .*got 'pooled'") as info:
        h0mini.embed_tiles(np.zeros((224, 224, 3), np.uint8), model=tiny, embedding="pooled")
    assert isinstance(info.value, errors.H0miniError) and isinstance(info.value, ValueError)


def test_an_unreadable_tile_error_says_how_to_skip_it(tmp_path, tiny, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(errors.InvalidTileError, match=r"bad\.png.*on_error=\"skip\""):
        h0mini.embed_tiles([str(bad)], model=tiny)
    err = cli_embed_error(bad, tmp_path, capsys)
    assert "--on-error skip" in err and "on_error=" not in err


def test_every_command_states_the_batch_size_default_the_embedder_applies():
    from h0mini.embed import DEFAULT_BATCH_SIZE

    parser = h0mini.cli.main_parser()
    commands = parser._subparsers._group_actions[0].choices
    wanted = f"{DEFAULT_BATCH_SIZE['cuda']} on CUDA, {DEFAULT_BATCH_SIZE['cpu']} on CPU"
    for name in ("embed", "embed-slides", "robustness"):
        helps = [a.help for a in commands[name]._actions if "--batch-size" in a.option_strings]
        assert helps and wanted in helps[0], (name, helps)
    assert h0mini.TileEmbedder(make_model(), device="cpu").batch_size == DEFAULT_BATCH_SIZE["cpu"]


def test_top_k_retrieval_with_too_few_tiles_warns_that_it_is_trivial(tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    from h0mini.eval.report import robustness_report

    tiles = [Image.open(p).convert("RGB") for p in EXAMPLE_TILES[:4]]
    rng = np.random.default_rng(0)

    def embed(images):
        return rng.standard_normal((len(images), 8))

    with pytest.warns(UserWarning, match=r"top-5 retrieval among 7 candidates \(4 tiles\).*by construction"):
        robustness_report(tiles, {"m": embed}, tmp_path / "r", perturbations={"blur": (1.0,)}, ks=(1, 5), n_examples=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        robustness_report(tiles, {"m": embed}, tmp_path / "r2", perturbations={"blur": (1.0,)}, ks=(1, 3), n_examples=0)


def test_a_robustness_report_on_demo_weights_says_so_in_its_tables(tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    folder = write_demo_weights(tmp_path / "demo", arch="h0mini_test")
    out = tmp_path / "report"
    assert main(["robustness", *map(str, EXAMPLE_TILES), "-o", str(out), "--weights", str(folder),
                 "--perturbations", "blur", "--examples", "0", "--top-k", "1,3"]) == 0
    assert f"warning: {folder}: {DEMO_WEIGHTS_LABEL}" in capsys.readouterr().err
    assert set(pd.read_csv(out / "metrics.csv")["model"]) == {f"demo ({DEMO_WEIGHTS_LABEL})"}
    assert DEMO_WEIGHTS_LABEL in (out / "report.md").read_text()
