"""Heads that sit on top of the backbones: the DINO/iBOT projection head and the feature projector.

``DINOHead`` follows DINOv2's ``dinov2/layers/dino_head.py``: an MLP
(in -> hidden -> hidden -> bottleneck, GELU, no batch norm), L2 normalisation,
then a weight-normalised linear layer onto K prototypes whose norm ``weight_g``
starts at 1 (logits start as cosines in [-1, 1]) and trains, as in DINOv2 (DINO v1
froze it). The parameter names
(``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer.weight_g``, ``last_layer.weight_v``)
match DINOv2 checkpoints, so a teacher's own heads load as they are.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are ``weight_g * weight_v / ||weight_v||``.

    Written out rather than through ``torch.nn.utils.weight_norm`` (deprecated) so the
    state dict keeps DINOv2's key names.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1, eps=1e-12)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (logits before temperature)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        nlayers = max(nlayers, 1)
        layers: list = []
        if nlayers == 1:
            layers.append(nn.Linear(in_dim, bottleneck_dim))
        else:
            layers += [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def head_state_from_checkpoint(state: Mapping[str, torch.Tensor], name: str) -> Dict[str, torch.Tensor]:
    """Keys of head ``name`` ("dino_head" or "ibot_head") from a checkpoint, prefix removed.

    Accepts plain head files (``dino_head.mlp.0.weight``) and DINOv2 training
    checkpoints (``teacher.dino_head.mlp.0.weight``). Old-style ``weight_g`` of shape
    (K, 1) and folded ``last_layer.weight`` are both understood.
    """
    marker = name + "."
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key and not key.startswith("student."):
            out[key.split(marker, 1)[1]] = value
    if "mlp.weight" in out:  # DINOv2's one-layer head is a bare Linear, not a Sequential
        out["mlp.0.weight"], out["mlp.0.bias"] = out.pop("mlp.weight"), out.pop("mlp.bias")
    if "last_layer.weight" in out and "last_layer.weight_v" not in out:
        out["last_layer.weight_v"] = out.pop("last_layer.weight")
        out["last_layer.weight_g"] = out["last_layer.weight_v"].norm(dim=1, keepdim=True)
    if "last_layer.weight_g" in out:
        out["last_layer.weight_g"] = out["last_layer.weight_g"].reshape(-1, 1)
    return out


class FeatureProjector(nn.Module):
    """Student tokens -> teacher width: LayerNorm, Linear, GELU, Linear (or one Linear when hidden is 0).

    RADIO-style adaptor: it lets a narrower student regress a wider teacher and is
    dropped at export, so the exported backbone is a plain ViT.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048):
        super().__init__()
        if hidden_dim > 0:
            self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                     nn.Linear(hidden_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
