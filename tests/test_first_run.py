"""A new user's first ten minutes: demo weights, messages in the reader's words, options where typed."""

from __future__ import annotations

import json
import warnings

import h5py
import pytest

import h0mini
import h0mini.cli
from h0mini import errors
from h0mini.cli import main
from h0mini.constants import DEMO_WEIGHTS_LABEL, NUM_PARAMS
from h0mini.testing import write_demo_weights

from helpers import EXAMPLE_TILES

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
    with pytest.raises(SystemExit):
        main(["demo-weights", str(folder)])  # a checkpoint is there: --force is needed
    assert "--force" in capsys.readouterr().err
    output = tmp_path / "out.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["embed", *map(str, EXAMPLE_TILES[:2]), "-o", str(output), "--weights", str(folder)]) == 0
    assert any(DEMO_WEIGHTS_LABEL in str(w.message) for w in caught)
    with h5py.File(output) as f:
        assert json.loads(f.attrs["h0mini_provenance"])["warning"] == DEMO_WEIGHTS_LABEL


def test_offline_without_weights_speaks_python_to_python_callers():
    with pytest.raises(errors.WeightsNotCachedError) as info:
        h0mini.load_model(REPO, local_files_only=True)
    message = str(info.value)
    assert "local_files_only=True was passed" in message and "load_model('/path/to/H0-mini')" in message
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
