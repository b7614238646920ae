"""The wheel a user installs: every package-data file inside, and it embeds outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import EXAMPLE_TILES, ROOT, write_checkpoint

# The package-data patterns of pyproject.toml, as the files they match in this checkout.
PACKAGE_DATA = {
    "h0mini": ["py.typed"],
    "h0mini/distill": ["configs/*.yaml"],
    "h0mini/eval/plism": ["data/*.npy", "data/ATTRIBUTION.md"],
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    egg_info_was_there = (ROOT / "h0mini.egg-info").exists()
    # --no-build-isolation: setuptools from this environment, nothing fetched.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(ROOT)],
        check=True, cwd=build, env=dict(os.environ, TMPDIR=str(build)),
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' scratch folders in the checkout
    if not egg_info_was_there:
        shutil.rmtree(ROOT / "h0mini.egg-info", ignore_errors=True)
    (found,) = out.glob("h0mini-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_carries_every_package_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        (path.relative_to(ROOT)).as_posix()
        for package, patterns in PACKAGE_DATA.items()
        for pattern in patterns
        for path in (ROOT / package).glob(pattern)
    }
    assert len(expected) >= 5  # configs, plism subsets, the attribution: the globs found files
    assert expected <= names, sorted(expected - names)
    assert any(name.endswith("entry_points.txt") for name in names)


@pytest.mark.slow
def test_the_installed_wheel_embeds_a_tile_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True)
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
