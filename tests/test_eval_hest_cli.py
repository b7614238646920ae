"""``h0mini hest``: several task folders, the leaderboard row, HEST's files."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("anndata")

from h0mini.cli import main  # noqa: E402
from tests.test_eval_hest import COMPONENTS, _write_task  # noqa: E402


def test_hest_command_prints_the_leaderboard_row(tmp_path, capsys):
    embeddings = tmp_path / "emb"
    for task, seed in (("LYMPH_IDC", 1), ("IDC", 2)):
        _, _, emb_dir = _write_task(tmp_path / task, seed=seed)
        shutil.copytree(emb_dir, embeddings / task)
    out = tmp_path / "results"
    code = main(["hest", str(tmp_path / "LYMPH_IDC"), str(tmp_path / "IDC"), "-o", str(out), "--embeddings", str(embeddings), "--n-components", str(COMPONENTS)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "# NOT the leaderboard protocol: PCA(8)"  # the synthetic folds have fewer than 256 spots
    assert lines[1] == "| Mean of 2 tasks | IDC | LYMPH_IDC |"  # HEST's column order, not the order given
    values = [float(v) for v in lines[3].strip("| ").split(" | ")]
    idc = json.loads((out / "IDC" / "results_kfold.json").read_text())["pearson_mean"]
    lymph = json.loads((out / "LYMPH_IDC" / "results_kfold.json").read_text())["pearson_mean"]
    assert values == pytest.approx([round((idc + lymph) / 2, 4), round(idc, 4), round(lymph, 4)], abs=1e-4)
    assert (out / "IDC" / "split2" / "results.json").is_file()


def test_hest_command_refuses_a_folder_without_splits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["hest", str(tmp_path), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "not a HEST-bench task folder" in capsys.readouterr().err
