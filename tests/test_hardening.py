"""What a hostile user found in a fault-injection run (issue 13), each pinned by a test."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import h0mini
import h0mini.model
import h0mini.testing
from h0mini.errors import GatedModelError, InvalidTileError, OutputNotWritableError
from h0mini.writers import read_embeddings
from fake_hub import FakeHub, FakeRepo
from helpers import EXAMPLE_TILES, ROOT, checkpoint_files
from test_cli_embed import checkpoint, embed, tiles  # noqa: F401  (shared fixtures)


@pytest.fixture
def hub(checkpoint, point_hub_at):
    with FakeHub() as server:
        server.repos[REPO] = FakeRepo(files=checkpoint_files(checkpoint))
        server.repos["test-org/gated-tiny"] = FakeRepo(files=checkpoint_files(checkpoint), gated=True, token="hf_granted")
        point_hub_at(server.url)
        yield server


REPO = "test-org/h0mini-tiny"


# -- outputs: fail fast, name the path, leave nothing behind ------------------------------------------


def _no_model(*args, **kwargs):
    pytest.fail("the model was loaded before the output was checked")


@pytest.mark.parametrize("case", ["existing folder", "parent is a file", "read-only folder", "read-only for root"])
def test_an_unwritable_output_fails_before_the_model_loads(case, tiles, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(h0mini.model, "load_model", _no_model)  # the command imports it late
    if case == "existing folder":
        out = tmp_path / "features.h5"
        out.mkdir()
    elif case == "parent is a file":
        (tmp_path / "blocker").write_text("")
        out = tmp_path / "blocker" / "sub" / "f.h5"
    elif case == "read-only for root":  # /proc refuses new files to root too: this case runs everywhere
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc on this system")
        out = Path("/proc/self/f.h5")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders (the /proc case covers root)")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "f.h5"
    assert embed(tiles, "-o", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and repr(str(out)) in err


def test_a_missing_parent_folder_is_created(checkpoint, tiles, tmp_path):
    out = tmp_path / "new" / "deeper" / "f.h5"
    assert embed(tiles, "-o", out, "--weights", checkpoint) == 0
    assert len(read_embeddings(out)) == 7


def test_stale_temp_files_of_killed_runs_are_removed_and_live_ones_kept(checkpoint, tiles, tmp_path):
    out = tmp_path / "f.h5"
    old_style = tmp_path / ".f.h5.k2j4_x9a.tmp"  # mkstemp's name, before the writer's pid was in it
    dead = tmp_path / f".f.h5.{_dead_pid()}-0a1b2c3d.tmp"
    live = tmp_path / f".f.h5.{os.getppid()}-0a1b2c3d.tmp"  # a concurrent writer: not ours to delete
    other = tmp_path / ".g.h5.k2j4_x9a.tmp"  # another output's
    for path in (old_style, dead, live, other):
        path.write_bytes(b"")
    assert embed(tiles, "-o", out, "--weights", checkpoint) == 0
    assert not old_style.exists() and not dead.exists()
    assert live.exists() and other.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("suffix", [".h5", ".npy", ".pt"])
def test_outputs_respect_the_umask(checkpoint, tiles, tmp_path, suffix):
    previous = os.umask(0o022)
    try:
        out = tmp_path / f"f{suffix}"
        assert embed(tiles, "-o", out, "--weights", checkpoint, "--output-mode", "cls") == 0
    finally:
        os.umask(previous)
    written = [out] + ([out.with_name(out.name + ".json")] if suffix == ".npy" else [])
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_full_disk_names_the_path_and_keeps_finished_batches(checkpoint, tiles, tmp_path, capsys, monkeypatch):
    from h0mini import writers

    out = tmp_path / "f.h5"

    def full(tmp, embeddings):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers, "_write_h5", full)
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--save-every", "2") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(str(out)) in err and "finished batches were kept" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert embed(tiles, "-o", out, "--weights", checkpoint) == 0
    assert "7 reused" in capsys.readouterr().out


def test_python_api_checks_an_output_folder_before_loading(tmp_path):
    from h0mini.writers import check_writable

    (tmp_path / "file").write_text("")
    with pytest.raises(OutputNotWritableError, match="is a file"):
        check_writable(tmp_path / "file", folder=True)
    with pytest.raises(OutputNotWritableError, match="is a folder"):
        check_writable(tmp_path)
    check_writable(tmp_path / "a" / "b", folder=True)
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


# -- the Hub: first contact without weights, refused tokens ------------------------------------------

UNRESOLVABLE = "http://nonexistent.invalid"  # .invalid never resolves (RFC 6761): no real host is asked


def test_an_unresolvable_hub_gives_one_line_without_retries(tiles, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=UNRESOLVABLE, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    for variable in ("HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, "-m", "h0mini", "embed", str(tiles), "-o", str(tmp_path / "f.h5")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Retrying" not in result.stderr, result.stderr
    assert "'nonexistent.invalid' does not resolve" in result.stderr and "h0mini download" in result.stderr


def test_an_unresolvable_hub_still_loads_cached_weights(hub, point_hub_at, monkeypatch):
    reference = h0mini.load_model(REPO)  # now in the cache
    point_hub_at(UNRESOLVABLE)
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    model = h0mini.load_model(REPO)
    assert model.h0mini_weights.sha256 == reference.h0mini_weights.sha256


def _no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.mark.parametrize("source", ["argument", "HF_TOKEN", "login file"])
def test_a_refused_token_names_its_source_never_the_token(source, hub, isolated_hub, monkeypatch):
    secret = "hf_secret_not_granted"
    kwargs = {}
    if source == "argument":
        kwargs["token"] = secret
        expected = "token passed as token="
    elif source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", secret)
        expected = "HF_TOKEN environment variable"
    else:
        from huggingface_hub import constants as hf_constants

        Path(hf_constants.HF_TOKEN_PATH).write_text(secret)
        expected = "hf auth login"
    with pytest.raises(GatedModelError) as info:
        h0mini.load_model("test-org/gated-tiny", **kwargs)
    message = str(info.value)
    assert expected in message and secret not in message and "No token was sent" not in message
    assert any(auth == f"Bearer {secret}" for _, _, auth in hub.requests)  # it was sent, and refused


# -- memory: extreme aspect ratios --------------------------------------------------------------------


@pytest.fixture(scope="module")
def preprocessing():
    import timm

    from h0mini.preprocess import Preprocessing

    return Preprocessing.from_model(timm.create_model("h0mini_test"))


def MODEL_CARD_GEOMETRY(image):
    """timm's eval resize and crop at the upstream config (224 px, bicubic, crop_pct 1.0), typed out."""
    from torchvision import transforms as T

    return T.CenterCrop(224)(T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(image))


ORDINARY_SHAPES = [(256, 256), (512, 512), (300, 250), (250, 300), (224, 500), (1000, 240), (225, 224), (50, 70),
                   (224, 3584)]  # (width, height), up to 16:1: the model card's transform itself


@pytest.mark.parametrize("shape", ORDINARY_SHAPES)
def test_ordinary_tiles_get_exactly_the_model_card_pixels(preprocessing, shape):
    for path in EXAMPLE_TILES:
        image = Image.open(path).convert("RGB").resize(shape, Image.Resampling.BILINEAR)
        expected = np.asarray(MODEL_CARD_GEOMETRY(image))  # the upstream resize and crop, spelled out
        assert np.array_equal(preprocessing.prepare(image), expected), (path.name, shape)


@pytest.mark.parametrize("shape", [(20, 640), (640, 20), (7, 448), (1, 64)])
def test_elongated_tiles_keep_the_model_card_geometry_within_a_grey_level(preprocessing, shape):
    for path in EXAMPLE_TILES:
        image = Image.open(path).convert("RGB").resize(shape, Image.Resampling.BILINEAR)
        expected = np.asarray(preprocessing._resize(image)).astype(int)
        got = preprocessing.prepare(image).astype(int)
        assert got.shape == (224, 224, 3) and np.abs(got - expected).max() <= 2, (path.name, shape)
        assert np.abs(got - expected).mean() < 0.05


def test_an_elongated_tile_is_never_resampled_whole(preprocessing, monkeypatch):
    sizes = []
    real_resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    assert preprocessing.prepare(Image.new("RGB", (1, 60), "red")).shape == (224, 224, 3)
    assert max(w * h for w, h in sizes) <= 224 * 224  # timm's transform: 224 x 13440


@pytest.mark.parametrize("shape", [(1, 40000), (40000, 1), (1, 65), (3, 1000)])
def test_an_absurd_aspect_ratio_is_refused_by_name_before_decoding(shape, tmp_path):
    from h0mini.tiles import open_image

    path = tmp_path / "strip.png"
    Image.new("RGB", shape).save(path)
    with pytest.raises(InvalidTileError, match=r"'.*strip\.png'.*not a tile.*64:1"):
        open_image(str(path))


@pytest.mark.parametrize("make", [lambda: torch.zeros(3, 1, 40000), lambda: np.zeros((40000, 1, 3), np.uint8),
                                  lambda: Image.new("RGB", (40000, 1))])
def test_in_memory_tiles_with_an_absurd_aspect_ratio_are_refused(make):
    model = h0mini.testing.random_model("h0mini_test", 0)
    with pytest.raises(InvalidTileError, match="not a tile"):
        h0mini.embed_tiles([make()], model)


def test_robustness_and_viz_readers_refuse_absurd_tiles_and_crop_elongated_ones(tmp_path):
    from h0mini import viz
    from h0mini.eval.report import load_tiles

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 40000)).save(strip)
    with pytest.raises(InvalidTileError, match="strip.png"):
        load_tiles([strip])
    with pytest.raises(InvalidTileError, match="strip.png"):
        viz.load_tile(strip, 224)
    with pytest.raises(InvalidTileError, match="not a tile"):
        viz.load_tile(np.zeros((40000, 1, 3), np.uint8), 224)
    assert viz.load_tile(Image.new("RGB", (30, 1500), "blue"), 224).shape == (224, 224, 3)


# -- messages: hostile image files ------------------------------------------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size, reason", [((1, 100_000_000), "not a tile"), ((100_000_000, 1), "not a tile"),
                                          ((100_000, 100_000), "decompression-bomb limit.*10000000000 pixels")])
def test_a_lying_png_header_is_a_named_invalid_tile(size, reason, tmp_path):
    from h0mini.tiles import open_image

    path = tmp_path / "liar.png"
    path.write_bytes(_png_header_claiming(*size))
    with pytest.raises(InvalidTileError, match=reason) as info:
        open_image(str(path))
    assert str(info.value).startswith(repr(str(path)))


def test_a_float_tiff_is_named_as_such_not_as_corrupt(tmp_path):
    from h0mini.tiles import open_image

    path = tmp_path / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((64, 64), dtype=np.float32), "F").save(path)
    with pytest.raises(InvalidTileError, match="32-bit float") as info:
        open_image(str(path))
    assert "corrupt" not in str(info.value) and "float.tif" in str(info.value)


def test_a_decompression_bomb_warning_names_the_tile(tmp_path, monkeypatch):
    import warnings

    from h0mini.tiles import open_image

    path = tmp_path / "big.png"
    Image.new("RGB", (224, 224)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 224 x 224 is over it, under twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_image(str(path)).size == (224, 224)
    messages = [str(w.message) for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert len(messages) == 1 and repr(str(path)) in messages[0] and "224x224" in messages[0]


# -- messages: Ctrl-C ------------------------------------------------------------------------------

CONSOLE_SCRIPT = "import sys\nfrom _h0mini_command import main\nsys.exit(main())\n"  # as pip writes it


@pytest.mark.parametrize("how", ["python -m h0mini", "console script"])
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])  # while torch and timm import, on this machine
def test_ctrl_c_during_start_up_is_one_line_and_130(how, delay, tiles, tmp_path):
    import signal
    import time

    if how == "console script":
        script = tmp_path / "bin" / "h0mini"
        script.parent.mkdir()
        script.write_text(CONSOLE_SCRIPT)
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-m", "h0mini"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"))
    process = subprocess.Popen(command + ["embed", str(tiles), "-o", str(tmp_path / "f.h5"), "--weights",
                                          str(tmp_path / "none")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 1 and "error:" in err:
        pytest.skip("the command finished before the signal")
    assert (process.returncode, err) == (130, "interrupted\n")


def test_importing_h0mini_in_a_program_leaves_ctrl_c_alone():
    code = "import signal, h0mini; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


# -- inputs: symbolic links ------------------------------------------------------------------------


@pytest.fixture
def looped(tmp_path):
    """A folder with one tile, two links back up the tree, a linked folder and a broken link."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLE_TILES[0], root / "sub" / "a.png")
    (root / "sub" / "up").symlink_to("..")
    (root / "sub" / "here").symlink_to(".")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(EXAMPLE_TILES[1], outside / "b.png")
    (root / "linked").symlink_to(outside)
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    return root


def test_a_recursive_glob_follows_links_but_enters_each_folder_once(looped):
    from h0mini.tiles import expand_path

    paths = [ref.path for ref in expand_path(str(looped / "**" / "*.png"))]
    assert paths == [str(looped / "gone.png"), str(looped / "linked" / "b.png"), str(looped / "sub" / "a.png")]


def test_a_broken_link_is_a_skipped_tile_not_a_silent_drop(looped, checkpoint, tmp_path, capsys):
    out = tmp_path / "f.h5"
    assert embed(str(looped / "**" / "*.png"), "-o", out, "--weights", checkpoint, "--on-error", "skip") == 0
    captured = capsys.readouterr()
    assert "2 embedded" in captured.out and "1 skipped" in captured.out
    assert "gone.png" in captured.err and "broken symbolic link" in captured.err
    assert embed(looped, "-o", tmp_path / "g.h5", "--weights", checkpoint) == 1  # the folder form: named, stops
    assert "gone.png" in capsys.readouterr().err


# -- messages: hostile file names --------------------------------------------------------------------


def test_a_file_name_cannot_forge_a_line_or_an_escape_code(checkpoint, tiles, tmp_path, capsys):
    hostile = tiles / "x\nerror: all tiles corrupt\x1b[2J.png"
    hostile.write_bytes(b"not an image")
    out = tmp_path / "f\x1b[31m.h5"
    assert embed(tiles, "-o", out, "--weights", checkpoint, "--on-error", "skip") == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("skipped")] == [
        line for line in captured.err.splitlines() if "all tiles corrupt" in line]
    assert not any(line.startswith("error:") for line in captured.err.splitlines())
    assert captured.out.count("\n") == 1 and "7 embedded" in captured.out
