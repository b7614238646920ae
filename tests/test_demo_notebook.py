"""examples/quickstart.ipynb: committed without outputs, and executed headless against a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, write_checkpoint

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def execute(notebook, tmp_path, monkeypatch, weights=None):
    """Run the notebook in a fresh kernel, in examples/, offline (the kernel is a separate process)."""
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    if weights is not None:
        monkeypatch.setenv("H0MINI_WEIGHTS", str(weights))
    client = NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    return client.execute()


@pytest.fixture
def nbformat():
    for package in ("nbclient", "ipykernel"):
        pytest.importorskip(package)
    return pytest.importorskip("nbformat")


def test_notebook_is_committed_with_outputs_cleared():
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "clear the outputs before committing"
    assert "H0MINI_WEIGHTS" in "".join("".join(c["source"]) for c in notebook["cells"])


def test_notebook_runs_headless_on_a_local_checkpoint(nbformat, tmp_path, monkeypatch):
    """As the README runs it: jupyter nbconvert --execute (nbconvert is in [dev])."""
    pytest.importorskip("nbconvert")
    folder = tmp_path / "ckpt"
    write_checkpoint(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLCONFIGDIR=str(tmp_path / "mpl"), H0MINI_WEIGHTS=str(folder),
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(NOTEBOOK),
         "--output-dir", str(tmp_path), "--ExecutePreprocessor.timeout=180"],
        check=True, env=env, capture_output=True, timeout=600,
    )
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert f"h0mini_test from {folder}" in text
    assert "tile embeddings: (7, 96)  patch tokens: (7, 256, 48)" in text
    assert "maps: (7, 16, 16, 3) background: (7, 16, 16)" in text
    assert "cmu1_x0896_y0448: " in text and "cmu1_x1120_y0896: 0% of the patches masked" in text
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    # tile grid, PCA map, one-tile map, all-tile map (+ UMAP when umap-learn is installed)
    assert len(pictures) >= 4
    assert not list(NOTEBOOK.parent.glob("*.png")), "the notebook must not write into examples/"


def test_notebook_without_weights_shows_the_access_message(nbformat, tmp_path, monkeypatch):
    """No H0MINI_WEIGHTS and offline: the first cell fails with the message the CLI prints."""
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [next(c for c in notebook.cells if c.cell_type == "code")]
    with pytest.raises(CellExecutionError) as caught:
        execute(notebook, tmp_path, monkeypatch)
    assert "WeightsNotCachedError" in str(caught.value)
    assert "bioptimus/H0-mini" in str(caught.value) and "h0mini download" in str(caught.value)


def test_quickstart_script_runs_on_a_local_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT, write_checkpoint

    write_checkpoint(tmp_path / "weights")
    env = dict(os.environ, H0MINI_WEIGHTS=str(tmp_path / "weights"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "embeddings: (7, 96) float32" in result.stdout
    assert result.stdout.count("most similar to") == 7
