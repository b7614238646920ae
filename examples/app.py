"""A small Gradio demo in the style of a Hub Space: upload a tile, see its patch-feature map and its
nearest neighbours among the example tiles.

Run it with::

    pip install 'h0mini[demo]'
    python examples/app.py                        # H0-mini from the Hub (gated: request access first)
    python examples/app.py --weights ./H0-mini    # a local checkpoint folder: nothing is downloaded

``H0MINI_WEIGHTS`` works as well as ``--weights``. Importing this file starts nothing: ``build_demo(model)``
returns the ``gradio.Blocks`` app, and ``TileSearch`` holds the logic, usable without Gradio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

import h0mini
from h0mini import viz
from h0mini.preprocess import Preprocessing
from h0mini.wording import command_line_words

EXAMPLE_TILES = sorted((Path(__file__).resolve().parent / "tiles").glob("*.png"))


class TileSearch:
    """Reference tiles embedded once; ``analyse(image)`` maps a new tile and finds its neighbours.

    Similarity is the cosine of the ``cls+mean`` embeddings (the model card's). The patch-feature
    PCA is fitted over the query and all reference tiles together, so colours mean the same
    thing in the query's map and in the neighbours'.
    """

    def __init__(self, model: torch.nn.Module, reference_tiles: Sequence[Path] = EXAMPLE_TILES, *,
                 threshold: Optional[float] = 0.35):
        if not reference_tiles:
            raise ValueError("TileSearch needs at least one reference tile")
        self.model = model
        self.threshold = threshold
        self.names = [Path(p).stem for p in reference_tiles]
        self.preprocessing = Preprocessing.from_model(model)
        self.reference_pixels = np.stack([_uint8(self.preprocessing.prepare(Path(p))) for p in reference_tiles])
        tokens = self._embed(self.reference_pixels)
        self.reference_patches = tokens["patch_tokens"]
        self.reference_vectors = _unit(_cls_mean(tokens))

    def _embed(self, pixels: np.ndarray) -> dict:
        return h0mini.embed_tiles(pixels, self.model, embedding="all", progress=False, num_workers=0)

    def analyse(self, image: Any, k: int = 3) -> Tuple[np.ndarray, List[Tuple[np.ndarray, str]], str]:
        """Feature map of ``image`` (PIL, array or path) and its ``k`` nearest reference tiles.

        Returns:
            the tile and its patch-feature map side by side (uint8, 224 x 452 x 3 for H0-mini); a list of
            ``(image, caption)`` for the neighbours (each also shown with its map); a Markdown summary.
        """
        if image is None:
            raise ValueError("upload a tile first")
        pixels = _uint8(self.preprocessing.prepare(image))
        tokens = self._embed(pixels[None])
        similarity = self.reference_vectors @ _unit(_cls_mean(tokens))[0]
        order = np.argsort(-similarity, kind="stable")[: max(1, min(k, len(similarity)))]
        maps = viz.patch_feature_rgb(
            np.concatenate([tokens["patch_tokens"], self.reference_patches]),
            threshold=self.threshold,
            tiles=[pixels, *self.reference_pixels],
            tile_size=None,
        )
        query = viz.side_by_side(pixels, maps.rgb[0], tile_size=pixels.shape[0])
        neighbours = [
            (viz.side_by_side(self.reference_pixels[i], maps.rgb[1 + i], tile_size=pixels.shape[0]),
             f"{self.names[i]}: cosine {similarity[i]:.3f}")
            for i in order
        ]
        summary = (
            f"Background (black in the map): {maps.background[0].mean():.0%} of the patches. "
            f"Nearest example tile: **{self.names[order[0]]}** (cosine {similarity[order[0]]:.3f}, "
            "cls+mean embeddings)."
        )
        return query, neighbours, summary


def build_demo(model: Optional[torch.nn.Module] = None, *, reference_tiles: Sequence[Path] = EXAMPLE_TILES,
               k: int = 3, threshold: Optional[float] = 0.35) -> Any:
    """The Gradio app (``gradio.Blocks``), not launched. ``model`` defaults to ``h0mini.load_model()``."""
    try:
        import gradio as gr
    except ImportError as error:
        raise h0mini.OptionalDependencyError("gradio", extra="demo", feature="the demo app") from error
    search = TileSearch(model if model is not None else h0mini.load_model(), reference_tiles, threshold=threshold)
    weights = getattr(search.model, "h0mini_weights", None)
    source = weights.source if weights is not None else type(search.model).__name__

    def analyse(image: Any) -> Tuple[np.ndarray, List[Tuple[np.ndarray, str]], str]:
        if image is None:
            raise gr.Error("Upload a tile first (224 x 224 px at 0.5 µm/px works best).")
        return search.analyse(image, k=k)

    with gr.Blocks(title="H0-mini patch features") as demo:
        gr.Markdown(
            "# H0-mini: patch features and nearest tiles\n"
            "Upload an H&E tile (ideally 224 x 224 px at 0.5 µm/px). Left: the tile as the model sees it; right: "
            "a PCA of its patch tokens in RGB (fitted together with the example tiles, so colours compare), "
            f"background in black. Below: the {k} most similar example tiles. Weights: `{source}`."
        )
        with gr.Row():
            upload = gr.Image(type="pil", label="tile", sources=["upload", "clipboard"], height=260)
            feature_map = gr.Image(type="numpy", label="tile | patch-feature map", format="png", interactive=False)
        summary = gr.Markdown()
        gallery = gr.Gallery(label="nearest example tiles", columns=k, format="png", height="auto")
        button = gr.Button("Analyse", variant="primary")
        button.click(analyse, inputs=upload, outputs=[feature_map, gallery, summary], api_name="analyse")
        upload.upload(analyse, inputs=upload, outputs=[feature_map, gallery, summary], api_name=False)
        gr.Examples([[str(p)] for p in reference_tiles[:4]], inputs=upload)
    return demo


def _uint8(pixels: Any) -> np.ndarray:
    """Prepared pixels as uint8 (H, W, 3): float tiles come back from preprocessing as (3, H, W) in [0, 1]."""
    if isinstance(pixels, torch.Tensor):
        return pixels.permute(1, 2, 0).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.asarray(pixels, dtype=np.uint8)


def _cls_mean(tokens: dict) -> np.ndarray:
    return np.concatenate([tokens["cls"], tokens["patch_tokens"].mean(1)], axis=-1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="H0-mini patch-feature demo (Gradio)")
    parser.add_argument("--weights", default=None, help="Hub repo id, local folder or weights file "
                        "(default: $H0MINI_WEIGHTS, else bioptimus/H0-mini)")
    parser.add_argument("--offline", action="store_true", help="use only cached or local files")
    parser.add_argument("--host", default=None, help="address to listen on (default: gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860)")
    args = parser.parse_args(argv)
    try:
        with command_line_words():  # messages name --weights and --offline, as the h0mini command's do
            model = h0mini.load_model(args.weights, local_files_only=True if args.offline else None)
        demo = build_demo(model)
    except h0mini.H0miniError as error:  # the message the h0mini command prints
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    demo.launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
