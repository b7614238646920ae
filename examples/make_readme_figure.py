"""Draw ``docs/images/patch_features.png``, the patch-feature figure of the README.

    python examples/make_readme_figure.py                        # tiny random model (what the repo ships)
    python examples/make_readme_figure.py --weights ./H0-mini    # real H0-mini weights, if you have access

H0-mini's weights are gated and may not be redistributed, and the machines that build this repository
have no access to them, so by default the figure is drawn with ``h0mini_test``: a 2-block, 48-wide
model of the same architecture with random weights (seed 0, LayerScale at trained-like magnitudes).
Its maps mostly reflect colour and brightness; the figure says so in its title.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import h0mini
from h0mini import viz
from h0mini.testing import random_model

HERE = Path(__file__).resolve().parent
TILES = [HERE / "tiles" / f"{name}.png" for name in
         ("cmu1_x0896_y0448", "cmu1_x1120_y0896", "cmu1_x1120_y2240", "cmu1_x1344_y1344")]
DEFAULT_OUTPUT = HERE.parent / "docs" / "images" / "patch_features.png"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="H0-mini weights (default: the tiny random test model)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help=f"PNG to write (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.weights:
        model = h0mini.load_model(args.weights)
        label = f"{model.h0mini_weights.arch} weights from {Path(str(model.h0mini_weights.source)).name}"
    else:
        model = random_model("h0mini_test")
        label = "tiny random test model h0mini_test (not H0-mini's weights)"
    tokens = h0mini.embed_tiles(TILES, model, embedding="patch_tokens", precision="fp32", progress=False)
    figure = viz.plot_patch_features(TILES, tokens, ncols=4, panel_size=1.8)
    figure.suptitle(
        f"PCA of patch tokens over these 4 tiles, in RGB; black: background (first component < 0.35). Model: {label}",
        fontsize=8,
    )
    path = viz.save_png(figure, args.output, dpi=100)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
