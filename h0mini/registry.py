"""timm entrypoints for H0-mini, its H-optimus teachers and a tiny test model.

Importing this module (``import h0mini`` does) is what makes
``timm.create_model("h0_mini", pretrained=True)`` work with no extra arguments:
the SwiGLU arguments that the Hub's config.json cannot express are fixed here,
and the pretrained config carries the Hub repo and the preprocessing.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from timm.layers import SwiGLUPacked
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .constants import (
    CROP_PCT,
    H0_MINI_REPO_ID,
    H_OPTIMUS_0_REPO_ID,
    H_OPTIMUS_1_REPO_ID,
    INTERPOLATION,
    MEAN,
    NUM_REGISTERS,
    PATCH_SIZE,
    STD,
    SWIGLU_MLP_RATIO,
    TILE_SIZE,
)

# Shared by every Bioptimus-style ViT: DINOv2 layout with registers and packed SwiGLU.
BIOPTIMUS_VIT_ARGS: Dict[str, Any] = dict(
    patch_size=PATCH_SIZE,
    img_size=TILE_SIZE,
    reg_tokens=NUM_REGISTERS,
    no_embed_class=True,
    init_values=1e-5,
    mlp_ratio=SWIGLU_MLP_RATIO,
    mlp_layer=SwiGLUPacked,
    act_layer=torch.nn.SiLU,
    num_classes=0,
    global_pool="",
    dynamic_img_size=True,
)

ARCH_ARGS: Dict[str, Dict[str, Any]] = {
    "h0_mini": dict(BIOPTIMUS_VIT_ARGS, embed_dim=768, depth=12, num_heads=12),
    "h_optimus_0": dict(BIOPTIMUS_VIT_ARGS, embed_dim=1536, depth=40, num_heads=24),
    "h_optimus_1": dict(BIOPTIMUS_VIT_ARGS, embed_dim=1536, depth=40, num_heads=24),
    # Same family, a fraction of the cost: for tests, demos and smoke runs.
    "h0mini_test": dict(BIOPTIMUS_VIT_ARGS, embed_dim=48, depth=2, num_heads=4),
}


def _cfg(hf_hub_id: str | None = None, license: str | None = None, **kwargs: Any) -> Dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id,
        "license": license,
        "num_classes": 0,
        "input_size": (3, TILE_SIZE, TILE_SIZE),
        "fixed_input_size": False,
        "pool_size": None,
        "interpolation": INTERPOLATION,
        "crop_pct": CROP_PCT,
        "crop_mode": "center",
        "mean": MEAN,
        "std": STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# timm's register_model reads this module-level dict, so it must come first.
default_cfgs = generate_default_cfgs(
    {
        "h0_mini.bioptimus": _cfg(hf_hub_id=H0_MINI_REPO_ID, license="cc-by-nc-nd-4.0"),
        "h_optimus_0.bioptimus": _cfg(hf_hub_id=H_OPTIMUS_0_REPO_ID, license="apache-2.0"),
        "h_optimus_1.bioptimus": _cfg(hf_hub_id=H_OPTIMUS_1_REPO_ID, license="other"),
        "h0mini_test.untrained": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    # Caller kwargs override the fixed architecture, as in timm's own entrypoints.
    if pretrained and kwargs.get("pretrained_cfg") is None:
        hub_cfg = _hub_pretrained_cfg(variant)
        if hub_cfg is not None:
            kwargs["pretrained_cfg"] = hub_cfg
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(ARCH_ARGS[variant], **kwargs),
    )
    if pretrained:
        from .model import log_preprocessing_changes

        log_preprocessing_changes(variant, model.pretrained_cfg, f"{variant} (pretrained)")
    return model


def _hub_pretrained_cfg(variant: str) -> Dict[str, Any] | None:
    """The ``pretrained_cfg`` of the Hub repo's config.json, as ``load_model`` and ``hf-hub:`` read it.

    One rule for every way in: preprocessing follows the config that travels with the weights, so
    ``timm.create_model("h0_mini", pretrained=True)`` gives what ``load_model()`` and the model
    card's ``timm.create_model("hf-hub:bioptimus/H0-mini")`` give, keys the config leaves out
    taking timm's defaults there as here.
    """
    default = default_cfgs.get(variant)
    repo_id = default.cfgs[default.tags[0]].hf_hub_id if default is not None and default.tags else None
    if not repo_id:
        return None
    from .hub import resolve_checkpoint
    from .model import architecture_for

    _, _, cfg = architecture_for(resolve_checkpoint(repo_id))
    return cfg


@register_model
def h0_mini(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """H0-mini: ViT-B/14, 4 registers, packed SwiGLU, distilled from H-optimus-0 (86M params)."""
    return _create("h0_mini", pretrained, **kwargs)


@register_model
def h_optimus_0(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """H-optimus-0: ViT-g/14, 4 registers, packed SwiGLU (1.1B params); H0-mini's teacher."""
    return _create("h_optimus_0", pretrained, **kwargs)


@register_model
def h_optimus_1(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """H-optimus-1: same architecture as H-optimus-0, trained on more data (gated, academic use)."""
    return _create("h_optimus_1", pretrained, **kwargs)


@register_model
def h0mini_test(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 2-block, 48-wide model of the H0-mini family, for tests and smoke runs."""
    return _create("h0mini_test", pretrained, **kwargs)
