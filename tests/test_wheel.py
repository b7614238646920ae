"""The wheel a user installs: every data file of the package inside, and it embeds and exports outside the
source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import EXAMPLE_TILES, ROOT, write_checkpoint


def package_data_files():
    """Every file of the package folder in this checkout that is not Python source: each must ship."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "h0mini").rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # Built from a copy: setuptools writes build/ and h0mini.egg-info/ beside the sources, and the
    # checkout's own (a developer's) must be left alone. (Not named "src": setuptools reads that
    # as a src layout.)
    source = build / "h0mini-source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "benchmarks", "docs"))
    # --no-build-isolation: setuptools from this environment, nothing fetched.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        check=True, cwd=build, env=dict(os.environ, TMPDIR=str(build)),
    )
    (found,) = out.glob("h0mini-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_carries_every_package_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = package_data_files()
    assert {"h0mini/py.typed", "h0mini/data/ATTRIBUTION.md"} <= expected  # the walk found the data files
    assert any(name.startswith("h0mini/data/tiles/") for name in expected)
    assert expected <= names, sorted(expected - names)
    assert any(name.endswith("entry_points.txt") for name in names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True)
    return target


@pytest.mark.slow
def test_the_installed_wheel_embeds_a_tile_outside_the_source_tree(installed, tmp_path):
    target = installed
    weights = tmp_path / "weights"
    write_checkpoint(weights)
    shutil.copy(EXAMPLE_TILES[0], tmp_path / "tile.png")
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")  # the wheel's h0mini, never the checkout's
    where = subprocess.run([sys.executable, "-c", "import h0mini; print(h0mini.__file__)"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(target), where
    done = subprocess.run(
        [sys.executable, "-m", "h0mini", "embed", "tile.png", "-o", "out.h5", "--weights", str(weights)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "out.h5: 1 tiles (1 embedded, 0 skipped)" in done.stdout
    import h5py

    with h5py.File(tmp_path / "out.h5") as f:
        assert f["features"].shape == (1, 96)


@pytest.mark.slow
def test_the_installed_wheel_exports_with_the_tiles_it_carries(installed, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    weights = tmp_path / "weights"
    write_checkpoint(weights)
    env = dict(os.environ, PYTHONPATH=str(installed), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "h0mini", "export", "-o", "onnx", "--weights", str(weights)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "ONNX Runtime fp32 vs torch fp32 on 7 tiles" in done.stdout  # the 7 shipped calibration tiles
    assert (tmp_path / "onnx" / "model.onnx").is_file()
