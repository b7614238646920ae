"""The command line speaks its own words: one line per problem, the command's own usage, nothing on -q,
usage errors before torch loads, and no model load when nothing is left to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import h0mini
import h0mini.model
from h0mini import errors
from h0mini.cli import main
from h0mini.constants import DEMO_WEIGHTS_LABEL, ENV_WEIGHTS
from h0mini.testing import write_demo_weights
from helpers import EXAMPLE_TILES, ROOT, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_weights(tmp_path_factory.mktemp("demo") / "demo", arch="h0mini_test")


def _no_model(*args, **kwargs):
    pytest.fail("the model was loaded")


def test_a_misspelled_option_prints_the_commands_usage_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["embed", "tiles/", "-o", "f.h5", "--precison", "fp32"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: h0mini embed ")
    assert "\nh0mini embed: error: unrecognized arguments: --precison (did you mean --precision?)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_in_command_line_words(tmp_path, capsys):
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(tmp_path / "f.h5"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == ("h0mini embed: error: --device 'cuda' was asked for but CUDA is not available; "
                   "use --device cpu\n")
    from h0mini.runtime import resolve_device

    with pytest.raises(ValueError, match=r"^device 'cuda' was asked for .*; use device='cpu'$"):
        resolve_device("cuda")  # Python callers read Python words


def test_a_folder_given_as_the_output_file_is_named(tmp_path, capsys):
    folder = tmp_path / "tiles"
    folder.mkdir()
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: -o {str(folder)!r} is a folder, but -o names the output file: name a file inside it, "
                   f"e.g. -o {str(folder / 'features.h5')!r}\n")


def test_a_file_in_the_way_of_the_output_folder_is_named(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "f.h5"
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{str(tmp_path / 'afile')!r} is a file, not a folder" in err and "File exists" not in err


def test_the_random_weights_notice_is_one_plain_line_and_python_keeps_its_warning(demo, tmp_path, capsys):
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(tmp_path / "f.h5"), "--weights", str(demo)]) == 0
    err = capsys.readouterr().err
    assert err == f"warning: {demo}: {DEMO_WEIGHTS_LABEL}\n"
    with pytest.warns(UserWarning, match=DEMO_WEIGHTS_LABEL):
        h0mini.load_model(demo)


@pytest.mark.parametrize("command", ["embed", "card"])
def test_quiet_prints_nothing_on_success(command, demo, tmp_path, capsys):
    if command == "embed":
        argv = ["embed", str(EXAMPLE_TILES[0]), "-o", str(tmp_path / "f.h5"), "--weights", str(demo), "-q"]
    else:
        argv = ["-q", "card", "--weights", str(demo), "-o", str(tmp_path / "README.md")]
    assert main(argv) == 0
    assert capsys.readouterr() == ("", "")


def test_quiet_with_skipped_tiles_prints_nothing_and_records_them(demo, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "f.h5"
    assert main(["embed", str(EXAMPLE_TILES[0]), str(bad), "-o", str(out), "--weights", str(demo), "--on-error",
                 "skip", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    from h0mini.writers import read_embeddings

    assert [s["path"] for s in read_embeddings(out).skipped] == [str(bad)]


def test_quiet_still_prints_errors(tmp_path, capsys):
    assert main(["-q", "embed", str(tmp_path / "missing.png"), "-o", str(tmp_path / "f.h5")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_a_usage_error_comes_back_before_torch_is_imported(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "h0mini", "embed", "x", "-o", "f.h5",
                           "--precison", "fp32"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "h0mini.cli" in imported and "torch" not in imported and "h0mini.embed" not in imported


def test_a_rerun_with_nothing_left_decides_already_done_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    tiles = tmp_path / "tiles"
    shutil.copytree(EXAMPLE_TILES[0].parent, tiles)
    out = tmp_path / "f.h5"
    argv = ["embed", str(tiles), "-o", str(out), "--weights", str(checkpoint), "--precision", "fp32"]
    assert main(argv) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(h0mini.model, "load_model", _no_model)
        assert main(argv) == 0
    assert capsys.readouterr().out == f"{out}: 7 tiles, already done (nothing to embed)\n"
    # Anything that changes the numbers, or a tile more, is a real run.
    assert main([*argv[:-1], "fp32", "--embedding", "cls", "--overwrite"]) == 0
    assert "7 embedded" in capsys.readouterr().out
    (tiles / "extra.png").write_bytes(EXAMPLE_TILES[0].read_bytes())
    assert main([*argv[:-1], "fp32", "--embedding", "cls"]) == 0
    assert "1 embedded, 7 reused" in capsys.readouterr().out


def test_other_weights_with_the_same_output_are_not_already_done(checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    write_checkpoint(other, seed=1)
    out = tmp_path / "f.h5"
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(out), "--weights", str(checkpoint)]) == 0
    assert main(["embed", str(EXAMPLE_TILES[0]), "-o", str(out), "--weights", str(other)]) == 1
    assert "already done" not in capsys.readouterr().out  # the run itself names the setting that differs


def test_a_relative_h0mini_weights_is_resolved_and_a_missing_one_names_the_folder(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint, tmp_path / "weights")
    monkeypatch.setenv(ENV_WEIGHTS, "weights")
    assert h0mini.load_model().h0mini_weights.source == str(tmp_path / "weights")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(errors.ModelNotFoundError) as info:
        h0mini.load_model()
    message = str(info.value)
    assert f"H0MINI_WEIGHTS='weights' is a relative path, and the current folder {str(tmp_path / 'elsewhere')!r}" \
           in message and "absolute path" in message


def test_a_missing_extra_names_the_install_from_a_clone_too():
    error = errors.OptionalDependencyError("openslide", extra="wsi", feature="Reading slides")
    assert "pip install 'h0mini[wsi]'" in str(error) and "pip install '.[wsi]'" in str(error)
