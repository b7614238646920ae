"""examples/app.py: the Gradio demo, served headless on 127.0.0.1 and asked once."""

from __future__ import annotations

import importlib.util
import socket

import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
from PIL import Image

import h0mini
from h0mini.cli import main as cli_main
from helpers import EXAMPLE_TILES, ROOT, write_checkpoint

GLASS_TILE = EXAMPLE_TILES[-1]  # cmu1_x1344_y1344: tissue and white glass


def load_app():
    spec = importlib.util.spec_from_file_location("h0mini_demo_app", ROOT / "examples" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder)
    return h0mini.load_model(folder)


@pytest.fixture
def offline_gradio(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # gradio_client's headers would ask the Hub
    gradio = pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    return gradio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_search_finds_the_tile_itself_and_maps_any_size(model):
    search = load_app().TileSearch(model)
    query, neighbours, summary = search.analyse(Image.open(GLASS_TILE), k=3)
    assert query.shape == (224, 452, 3) and query.dtype == np.uint8
    assert len(neighbours) == 3
    assert neighbours[0][1] == f"{GLASS_TILE.stem}: cosine 1.000"
    similarities = [float(caption.rsplit(" ", 1)[1]) for _, caption in neighbours]
    assert similarities == sorted(similarities, reverse=True)
    assert GLASS_TILE.stem in summary
    # a larger tile is resized and centre-cropped to the model's input, as embed_tiles does
    big = Image.open(GLASS_TILE).resize((336, 300))
    assert search.analyse(big)[0].shape == (224, 452, 3)


# gradio's own use of pandas 3 (not ours)
@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated")
@pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")
def test_app_answers_one_request_on_localhost(model, offline_gradio, tmp_path):
    from gradio_client import Client, handle_file

    demo = load_app().build_demo(model, k=3)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"),
                        analytics_enabled=False)
        feature_map, gallery, summary = client.predict(handle_file(str(GLASS_TILE)), api_name="/analyse")
    finally:
        demo.close()

    picture = np.asarray(Image.open(feature_map).convert("RGB"))
    assert picture.shape == (224, 452, 3)
    np.testing.assert_array_equal(picture[:, :224], np.asarray(Image.open(GLASS_TILE).convert("RGB")))
    feature_half = picture[:, 228:]
    black = (feature_half.max(-1) == 0).mean()
    assert 0.15 < black < 0.6, f"the glass of {GLASS_TILE.name} should be masked black ({black:.0%})"
    assert [item["caption"].split(":")[0] for item in gallery][0] == GLASS_TILE.stem
    assert len(gallery) == 3 and "cosine 1.000" in gallery[0]["caption"]
    assert GLASS_TILE.stem in summary


def test_app_without_weights_prints_the_cli_message(capsys):
    app = load_app()
    assert app.main(["--offline"]) == 1
    app_error = capsys.readouterr().err
    assert cli_main(["card", "--offline"]) == 1
    assert app_error == capsys.readouterr().err
    assert "bioptimus/H0-mini" in app_error
