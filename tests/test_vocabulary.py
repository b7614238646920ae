"""One vocabulary: the same option names and defaults in embed_tiles, TileEmbedder, embed_slide,
embed_slides and the command line; old names for one release; unknown names listed."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import pytest

import h0mini
from h0mini import errors
from h0mini.cli import main_parser
from h0mini.deprecation import RENAMED, take_options
from h0mini.hub import split_revision
from helpers import make_model

# The options every embedding entry point takes, keyword-only, with these defaults (README, "One vocabulary").
SHARED = {
    "embedding": "cls+mean", "batch_size": None, "device": "auto", "precision": "auto", "num_workers": "auto",
    "input_size": None, "compile": False, "jpeg_decode": "cpu", "revision": None, "token": None, "cache_dir": None,
}
RUN = {"on_error": "raise", "progress": None}  # the functions that run (not TileEmbedder, which is run by them)

ENTRY_POINTS = [
    pytest.param(h0mini.embed_tiles, ("tiles", "model"), True, id="embed_tiles"),
    pytest.param(h0mini.TileEmbedder.__init__, ("self", "model"), False, id="TileEmbedder"),
    pytest.param(h0mini.embed_slide, ("slide", "model"), True, id="embed_slide"),
    pytest.param(h0mini.embed_slides, ("slides", "model"), True, id="embed_slides"),
]


@pytest.mark.parametrize("function, leading, runs", ENTRY_POINTS)
def test_entry_points_share_names_defaults_and_argument_order(function, leading, runs):
    parameters = inspect.signature(function).parameters
    assert tuple(parameters)[:2] == leading  # the model second everywhere
    assert parameters["model"].default is None
    expected = dict(SHARED, **(RUN if runs else {}))
    for name, default in expected.items():
        assert name in parameters, f"{function.__qualname__} lacks {name}="
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].default == default, (name, parameters[name].default)
    # Old names live only in **options (a DeprecationWarning), never as parameters of their own.
    assert not set(RENAMED.get(function.__qualname__.split(".")[0], {})) & set(parameters)


def test_the_weights_options_of_load_model_are_those_of_the_entry_points():
    parameters = inspect.signature(h0mini.load_model).parameters
    for name in ("revision", "token", "cache_dir"):
        assert parameters[name].default is None
    assert parameters["device"].default == "auto"  # the same default as everywhere


def test_export_onnx_names_its_folder_and_tiles_as_the_command_does():
    from h0mini.export import export_onnx

    parameters = inspect.signature(export_onnx).parameters
    assert tuple(parameters)[:2] == ("model", "output_dir")
    assert parameters["calibration"].default is None
    action = _options(_command("export"))
    assert action["--output-dir"].dest == "output_dir" and "--calibration" in action


def _command(name: str) -> argparse.ArgumentParser:
    parser = main_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser):
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", ["embed", "embed-slides"])
def test_the_command_line_has_the_same_options_and_defaults(command):
    options = _options(_command(command))
    for name, default in dict(SHARED, on_error="raise").items():
        flag = "--" + name.replace("_", "-")
        assert flag in options, f"h0mini {command} lacks {flag}"
        assert options[flag].dest == name
        assert options[flag].default == default, (flag, options[flag].default)
    assert "--weights" in options and "--offline" in options
    assert options["--output-mode"].help == argparse.SUPPRESS  # the old name, hidden, for one release


def test_the_parser_choices_mirror_the_library():
    from h0mini import embed, jpeg, runtime, writers
    from h0mini.cli import choices
    from h0mini.wsi import claims, grid, reader

    assert choices.EMBEDDINGS == embed.OUTPUTS
    assert choices.JPEG_DECODERS == jpeg.JPEG_DECODERS
    assert choices.FORMATS == writers.FORMATS
    assert choices.DEFAULT_BATCH_SIZE == embed.DEFAULT_BATCH_SIZE
    assert choices.READERS == reader.READERS
    assert (choices.TARGET_MPP, choices.MIN_TISSUE) == (grid.TARGET_MPP, grid.MIN_TISSUE)
    assert choices.CLAIM_TIMEOUT == claims.CLAIM_TIMEOUT
    assert set(choices.PRECISIONS) - {"auto"} <= set(runtime.PRECISIONS)


# -- old names for one release, unknown names listed --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return make_model()


def _tiles():
    return np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


def test_old_names_keep_working_with_a_deprecation_warning(tiny):
    tiles = _tiles()
    new = h0mini.embed_tiles(tiles, tiny, embedding="cls", return_dtype="float16", precision="fp32", progress=False)
    with pytest.warns(DeprecationWarning, match=r"embed_tiles\(output=\.\.\.\) is deprecated.*use embedding="):
        with pytest.warns(DeprecationWarning, match=r"dtype=\.\.\.\) is deprecated.*use return_dtype="):
            old = h0mini.embed_tiles(tiles, tiny, output="cls", dtype="float16", precision="fp32", progress=False)
    assert old.dtype == new.dtype == np.float16 and old.shape == (2, 48)
    np.testing.assert_array_equal(old, new)
    with pytest.warns(DeprecationWarning, match="TileEmbedder"):
        assert h0mini.TileEmbedder(tiny, output="mean").embedding == "mean"


def test_an_old_and_a_new_name_together_is_an_error(tiny):
    with pytest.raises(errors.UnknownOptionError, match="pass only embedding="):
        h0mini.embed_tiles(_tiles(), tiny, output="cls", embedding="mean")


def test_the_export_names_are_renamed_the_same_way():
    from h0mini.export import export_onnx

    with pytest.warns(DeprecationWarning, match=r"export_onnx\(tiles=\.\.\.\).*calibration="):
        values = take_options("export_onnx", export_onnx, {"tiles": "t/", "output": "o/"},
                              {"output_dir": None, "calibration": None})
    assert values == {"output_dir": "o/", "calibration": "t/"}


@pytest.mark.parametrize("call", ["embed_tiles", "TileEmbedder"])
def test_an_unknown_option_lists_the_valid_ones_and_the_closest(tiny, call):
    with pytest.raises(errors.UnknownOptionError) as info:
        if call == "embed_tiles":
            h0mini.embed_tiles(_tiles(), tiny, devise="cpu")
        else:
            h0mini.TileEmbedder(tiny, devise="cpu")
    message = str(info.value)
    assert f"{call}() got an unknown option 'devise'. Did you mean device=?" in message
    assert "Valid options: " in message and "batch_size" in message and "precision" in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, errors.H0miniError)


def test_weights_options_with_a_loaded_model_are_an_error(tiny):
    with pytest.raises(errors.InvalidArgumentError, match="revision= apply to loading weights"):
        h0mini.TileEmbedder(tiny, revision="main")


def test_device_auto_keeps_a_passed_model_where_it_is(tiny):
    assert h0mini.TileEmbedder(tiny).device.type == next(tiny.parameters()).device.type


# -- weight names: repo@revision, hf-hub: --------------------------------------------------------------------


@pytest.mark.parametrize("weights, expected", [
    ("bioptimus/H0-mini", ("bioptimus/H0-mini", None)),
    ("bioptimus/H0-mini@" + "a" * 40, ("bioptimus/H0-mini", "a" * 40)),
    ("bioptimus/H0-mini@refs/pr/1", ("bioptimus/H0-mini", "refs/pr/1")),
    ("./weights", (None, None)),
    ("model.safetensors", (None, None)),
])
def test_repo_at_revision_is_split(weights, expected):
    assert split_revision(weights) == expected


def test_a_path_with_an_at_sign_that_exists_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("org").mkdir()
    Path("org/repo@v1").mkdir()
    assert split_revision("org/repo@v1") == (None, None)


def test_two_different_revisions_are_an_error():
    with pytest.raises(errors.InvalidArgumentError, match=r"names revision 'v1' but revision='v2' was also given"):
        split_revision("org/repo@v1", "v2")
    assert split_revision("org/repo@v1", "v1") == ("org/repo", "v1")


def test_the_vocabulary_table_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## One vocabulary"):]
    for word in ("`embedding=`", "`--embedding`", "`output_path=`", "`output_dir=`", "`return_dtype=`",
                 "`precision=`", "`device=`", "calibration="):
        assert word in table, word
    for renames in RENAMED.values():  # every old name is in the table too
        for old in renames:
            assert f"`{old}=`" in table or f"{old}=" in table, old
