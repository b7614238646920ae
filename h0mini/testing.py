"""Random models of the H0-mini family that behave like trained ones, for tests, benchmarks and demos.

A freshly initialised model has LayerScale gammas of 1e-5, so every block is nearly the
identity and the network is almost linear: equivalence, precision and speed checks on such
a model exercise only the patch embedding. ``random_model`` draws the gammas in 0.05-0.5,
magnitudes a trained model has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import timm
import torch

from . import registry  # noqa: F401  (the architectures must be registered)
from .card import render_model_card
from .checkpoint_io import write_hub_checkpoint
from .constants import DEMO_WEIGHTS_LABEL, H0_MINI_ARCH


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every LayerScale gamma a value drawn uniformly in [0.05, 0.5], in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(torch.empty(param.shape).uniform_(0.05, 0.5, generator=generator))
    return model


def random_model(arch: str = "h0mini_test", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A seeded random model of ``arch`` with trained-like LayerScale, in eval mode."""
    torch.manual_seed(seed)
    return trained_like(timm.create_model(arch, **kwargs), seed).eval()


def write_demo_weights(folder: Union[str, Path], *, arch: str = H0_MINI_ARCH, seed: int = 0) -> Path:
    """Write a full-size checkpoint with random, trained-like weights, to try h0mini without gated access.

    The folder has the Hub layout (``config.json``, ``model.safetensors``, ``README.md``), so
    ``load_model(folder)`` and every command's ``--weights folder`` take it like the real H0-mini:
    same architecture, shapes and speed, meaningless numbers. Its config and card say
    "random weights: for trying the pipeline, not for science"; ``load_model`` warns with that
    line and every output's provenance records it. Returns the folder.

    Example:
        >>> folder = h0mini.testing.write_demo_weights("./h0mini-demo")
        >>> model = h0mini.load_model(folder)  # UserWarning: random weights: ...
    """
    folder = Path(folder)
    model = random_model(arch, seed)
    write_hub_checkpoint(folder, model, arch, warning=DEMO_WEIGHTS_LABEL)
    card = render_model_card(
        {"weights": f"h0mini.testing.write_demo_weights(seed={seed})", "arch": arch, "warning": DEMO_WEIGHTS_LABEL},
        title=f"{arch} demo checkpoint: {DEMO_WEIGHTS_LABEL}",
        description=(
            f"**{DEMO_WEIGHTS_LABEL.capitalize()}.** Random weights with trained-like LayerScale, in the "
            f"architecture and Hub layout of {arch}, written by h0mini so that every command can be tried "
            "before access to the gated bioptimus/H0-mini is granted. The embeddings they give carry no "
            "biological meaning."
        ),
        license="other",
        tags=("random-weights", "demo"),
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder
