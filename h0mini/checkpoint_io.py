"""Write a model as a checkpoint folder in the Hub layout (config.json + model.safetensors).

The same folder ``load_model(folder)``, ``h0mini embed --weights folder`` and the Hub read;
demo weights and the tests' checkpoints are written through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors.torch import save_file

from .constants import CONFIG_NAME, CONFIG_WARNING_KEY, SAFETENSORS_NAME

PathLike = Union[str, Path]


def hub_config(arch: str, model: torch.nn.Module, *, warning: Optional[str] = None) -> Dict[str, Any]:
    """config.json as timm writes it for the Hub (architecture, model_args, pretrained_cfg).

    ``warning``, when given, is stored under ``h0mini_warning``: ``load_model`` repeats it as a
    warning and every output's provenance records it.
    """
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("hf_hub_id", "architecture", "tag", "source", "license")}
    config: Dict[str, Any] = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": model.num_features,
        "global_pool": "",
        "model_args": {},
        "pretrained_cfg": cfg,
    }
    if warning:
        config[CONFIG_WARNING_KEY] = warning
    return config


def write_hub_checkpoint(
    folder: PathLike,
    model: torch.nn.Module,
    arch: str,
    *,
    dtype: Optional[torch.dtype] = None,
    warning: Optional[str] = None,
) -> Path:
    """Save ``model`` (built as timm architecture ``arch``) to ``folder`` in the Hub layout; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / SAFETENSORS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(hub_config(arch, model, warning=warning), indent=2) + "\n")
    return folder
