"""Random models of the H0-mini family that behave like trained ones, for tests, benchmarks and demos.

A freshly initialised model has LayerScale gammas of 1e-5, so every block is nearly the
identity and the network is almost linear: equivalence, precision and speed checks on such
a model exercise only the patch embedding. ``random_model`` draws the gammas in 0.05-0.5,
magnitudes a trained model has.
"""

from __future__ import annotations

import timm
import torch

from . import registry  # noqa: F401  (the architectures must be registered)


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
