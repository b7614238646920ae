"""The exported student folder: byte-reproducible weights, permissions from the umask, an honest model card."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from h0mini.distill.config import load_config
from h0mini.distill.export import export_student
from h0mini.distill.meta_arch import build_student

from helpers import ROOT

TINY = ["data.sources=[tiles]", "student.arch=h0mini_test", "student.model_args={embed_dim: 24, depth: 1, num_heads: 2}"]

_EXPORT = """
import sys, torch
from h0mini.distill.config import load_config
from h0mini.distill.export import export_student
from h0mini.distill.meta_arch import build_student
config = load_config(None, sys.argv[2:])
torch.manual_seed(0)
export_student(build_student(config), sys.argv[1], config, teacher_dim=48, head_source="none",
               data_summary="3 tiles", steps=1, world_size=1)
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_weights_export_identical_bytes_across_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    hashes = set()
    for i in range(6):  # the metadata order used to change with the process (1 in 2 for 2 keys)
        subprocess.run([sys.executable, "-c", _EXPORT, str(tmp_path / f"e{i}"), *TINY], env=env, check=True)
        hashes.add(_sha(tmp_path / f"e{i}" / "model.safetensors"))
        assert _sha(tmp_path / f"e{i}" / "README.md") == _sha(tmp_path / "e0" / "README.md")
    assert len(hashes) == 1


def test_export_folder_and_files_follow_the_umask(tmp_path):
    config = load_config(None, TINY)
    old = os.umask(0o022)
    try:
        folder = export_student(build_student(config), tmp_path / "export", config, teacher_dim=48,
                                head_source="none", data_summary="3 tiles", steps=1, world_size=1)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        name: 0o644 for name in ("model.safetensors", "config.json", "training_config.json", "README.md")}


@pytest.mark.parametrize("norm, says", [
    ([], "the H-optimus-0 values"),
    (["data.mean=[0.485, 0.456, 0.406]", "data.std=[0.229, 0.224, 0.225]"], "ImageNet's values"),
    (["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]"], "neither H-optimus-0's nor ImageNet's"),
])
def test_model_card_names_the_normalisation_the_student_was_trained_with(tmp_path, norm, says):
    config = load_config(None, TINY + norm)
    folder = export_student(build_student(config), tmp_path / "export", config, teacher_dim=48, head_source="none",
                            data_summary="3 tiles", steps=1, world_size=1)
    card = (folder / "README.md").read_text()
    assert says in card
    assert str(list(config.data.mean)[0]) in card or f"{config.data.mean[0]:g}" in card
