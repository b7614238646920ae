"""Any frozen teacher as a token teacher: timm ViTs and CNNs by name, folder or local weights, or any ``nn.Module``.

The token contract the distiller relies on: ``forward_features(images)`` (or
``module(images)``) returns ``(B, P + N, D)`` tokens, where index 0 is the image
embedding ("CLS"), the first ``P = num_prefix_tokens`` tokens (default 1) are not
patches, and the last ``N`` are a square grid of patch tokens, row by row. The
patch size comes from ``patch_embed.patch_size`` or ``patch_size``; when neither
exists it is read off the grid of a probe forward. Patch grids that differ from
the student's are resized to it bilinearly (see ``Distiller``).

Two other outputs are adapted, so no hand-written wrapper is needed:

- a feature map ``(B, C, H, W)`` (a CNN such as timm's EfficientNet or ResNet): its
  ``H x W`` cells become the patch tokens and their mean the CLS token, the
  stride ``crop / H`` plays the patch size (any crop size works);
- one embedding per image ``(B, D)``: a CLS token only, which is enough for
  ``feature.cls_weight`` and the DINO loss but not for patch targets (refused
  with the fields to change).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
import torch
from torch import nn

from ..errors import IncompatibleCheckpointError
from .config import ConfigError, DistillConfig, validate_patch_size

# Asked of every timm teacher: token outputs. dynamic_img_size is only for architectures that take it (ViTs).
TEACHER_TIMM_ARGS = {"num_classes": 0, "global_pool": "", "dynamic_img_size": True}


def create_timm_model(name: str, kwargs: Mapping[str, Any], *, field: str, pretrained: bool = False,
                      pretrained_cfg: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``timm.create_model`` returning tokens or a feature map; ``None`` kwargs keep timm's defaults.

    ``dynamic_img_size`` is dropped for architectures that do not take it (CNNs
    accept any input size anyway); any other refused argument is a ConfigError on
    ``field``.
    """
    args = dict(kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **args)
    except TypeError as error:
        if "dynamic_img_size" in str(error) and args.get("dynamic_img_size") is not None:
            args["dynamic_img_size"] = None
            return create_timm_model(name, args, field=field, pretrained=pretrained, pretrained_cfg=pretrained_cfg)
        raise ConfigError(field, f"timm's {name!r} refuses {sorted(k for k, v in args.items() if v is not None)}: "
                          f"{error}") from error


def load_weights(model: nn.Module, file: Path, *, arch: str, field: str) -> None:
    """Strictly load a weights file into a timm model, ignoring the classifier the teacher no longer has."""
    from ..model import load_state_dict_strict, read_state_dict

    state = read_state_dict(file)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not classifier:  # a folder's config.json replaces timm's cfg and rarely names it
        try:
            classifier = timm.models.get_pretrained_cfg_value(arch, "classifier")
        except RuntimeError:  # an architecture without a registered cfg
            classifier = None
    if classifier and getattr(model, "num_classes", None) == 0:
        prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    for key, value in model.state_dict().items():  # BatchNorm counters: many exports leave them out
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    try:
        load_state_dict_strict(model, state, arch_name=arch, source=str(file))
    except IncompatibleCheckpointError as error:
        raise ConfigError(field, str(error)) from error


def build_teacher(config: DistillConfig, module: Optional[nn.Module] = None) -> nn.Module:
    """The frozen teacher: a given module, a timm name (+ ``teacher.weights``), or a local folder / Hub id."""
    t = config.teacher
    if module is None:
        name = t.model
        args = dict(TEACHER_TIMM_ARGS, **t.model_args)
        if timm.is_model(name) and not Path(name).expanduser().exists():
            module = create_timm_model(name, args, field="teacher.model_args",
                                       pretrained=t.pretrained and not t.weights)
            if t.weights:
                file = Path(t.weights).expanduser()
                if not file.is_file():
                    raise ConfigError("teacher.weights", f"no such file: {t.weights!r}")
                load_weights(module, file, arch=name, field="teacher.weights")
        else:
            if t.weights:
                raise ConfigError("teacher.weights", f"is for a timm model name; {name!r} is a folder or Hub id "
                                  "that holds its own weights: leave teacher.weights empty")
            module = _load_checkpoint_teacher(name, t.revision, t.model_args)
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def _load_checkpoint_teacher(name: str, revision: Optional[str], model_args: Mapping[str, Any]) -> nn.Module:
    """A Hub-layout folder or Hub id, built by its config.json's architecture (ViT or not)."""
    from ..hub import is_local, resolve_checkpoint
    from ..model import architecture_for

    if is_local(name) and not Path(name).expanduser().exists():
        raise ConfigError("teacher.model", f"{name!r} is neither a timm model, a Hub id nor an existing path")
    checkpoint = resolve_checkpoint(name, revision=revision)
    arch, kwargs, pretrained_cfg = architecture_for(checkpoint)
    kwargs.update(global_pool="", **model_args)
    model = create_timm_model(arch, kwargs, field="teacher.model_args", pretrained_cfg=pretrained_cfg)
    load_weights(model, checkpoint.weights_path, arch=arch, field="teacher.model")
    return model


def tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a model returns for ``images``: ``forward_features`` when it has one, else its call (first output)."""
    out = model.forward_features(images) if hasattr(model, "forward_features") else model(images)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def patch_size_attr(model: nn.Module) -> Optional[int]:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        patch = getattr(model, "patch_size", None)
    if patch is None:
        return None
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def prefix_tokens_of(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 1))


class FeatureMapTeacher(nn.Module):
    """A CNN as a token teacher: the cells of its last feature map are patch tokens, their mean the CLS."""

    num_prefix_tokens = 1

    def __init__(self, backbone: nn.Module, stride: int, channels: int):
        super().__init__()
        self.backbone = backbone
        self.patch_size = stride  # what a patch of the student grid is to a ViT: the map's stride
        self.embed_dim = channels

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        fmap = tokens(self.backbone, images)
        patches = fmap.flatten(2).transpose(1, 2)  # (B, H * W, C), row by row
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)


class EmbeddingTeacher(nn.Module):
    """A teacher returning one embedding per image: a CLS token and no patch tokens."""

    num_prefix_tokens = 1
    has_patch_tokens = False

    def __init__(self, backbone: nn.Module, dim: int, patch_size: int):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = dim
        self.patch_size = patch_size

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return tokens(self.backbone, images)[:, None]


def needs_patch_tokens(config: DistillConfig) -> Optional[str]:
    """The config field that asks for teacher patch tokens, or None."""
    if config.objective.feature > 0 and config.feature.patch_weight > 0:
        return "feature.patch_weight"
    if config.objective.dinov2 > 0 and config.dinov2.ibot_weight > 0:
        return "dinov2.ibot_weight"
    return None


def as_token_teacher(teacher: nn.Module, config: DistillConfig, device: torch.device) -> Tuple[nn.Module, int]:
    """(teacher honouring the token contract, its token width), probed once on a global crop.

    Raises:
        ConfigError: the output is not tokens, a map or embeddings; the tokens form no
            square grid; crops do not fit a ViT teacher's patch size; or the objective
            needs patch tokens the teacher does not have.
    """
    size = config.crops.global_size
    name = type(teacher).__name__
    dtype = next(iter(teacher.parameters()), torch.empty(0)).dtype
    with torch.inference_mode():
        out = tokens(teacher, torch.zeros(2, 3, size, size, device=device, dtype=dtype))
    if not isinstance(out, torch.Tensor):
        raise ConfigError("teacher.model", f"{name} returned {type(out).__name__}, not a tensor: see the token "
                          "contract in h0mini.distill.teachers")
    if out.ndim == 4:  # any crop size: the map is resized to the student's grid
        return FeatureMapTeacher(teacher, round(size / out.shape[-1]), out.shape[1]), int(out.shape[1])
    if out.ndim == 2:
        field = needs_patch_tokens(config)
        if field:
            raise ConfigError(field, f"{name} returns one {out.shape[1]}-d embedding per image (no patch tokens), "
                              "which this objective needs: set feature.patch_weight=0 and dinov2.ibot_weight=0, or "
                              "pass a teacher whose forward_features returns tokens or a feature map")
        return EmbeddingTeacher(teacher, int(out.shape[1]), patch_size_attr(teacher) or size), int(out.shape[1])
    if out.ndim != 3:
        raise ConfigError("teacher.model", f"{name} returned shape {tuple(out.shape)}: expected tokens (B, N, D), a "
                          "feature map (B, C, H, W) or embeddings (B, D)")
    n_patches = out.shape[1] - prefix_tokens_of(teacher)
    side = math.isqrt(max(n_patches, 0))
    if n_patches <= 0 or side * side != n_patches:
        raise ConfigError("teacher.model", f"{name} returned {out.shape[1]} tokens; with num_prefix_tokens="
                          f"{prefix_tokens_of(teacher)} the remaining {n_patches} form no square patch grid: set the "
                          "module's num_prefix_tokens to the number of leading non-patch tokens")
    patch = patch_size_attr(teacher)
    if patch is None:
        if size % side:
            raise ConfigError("teacher.model", f"{name} has no patch_size and its {side}x{side} grid does not tile "
                              f"a {size} px crop: set a patch_size attribute on the module")
        teacher.patch_size = size // side
        patch = teacher.patch_size
    validate_patch_size(config, patch, "teacher", local_crops=False)
    return teacher, int(out.shape[-1])
