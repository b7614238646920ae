"""Write the trained (EMA) student as a Hub-layout folder: config.json, model.safetensors, README.md.

``h0mini.load_model(folder)`` and ``h0mini.embed_tiles`` read it directly; so does
``timm.create_model("hf-hub:<you>/<repo>", pretrained=True)`` once published, for
architectures registered by ``import h0mini`` (the SwiGLU layer classes cannot be
written to JSON, which is why the architecture name, not the layer classes, is stored).

Publishing is one huggingface_hub call (not made here: it needs your token and intent)::

    from huggingface_hub import create_repo, upload_folder
    create_repo("you/my-student", private=True, exist_ok=True)
    upload_folder(repo_id="you/my-student", folder_path="distill-run/export")
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import save

from ..card import render_model_card
from ..constants import CONFIG_NAME, SAFETENSORS_NAME
from ..model import file_sha256
from ..version import __version__
from ..atomic import atomic_folder
from .config import ConfigError, DistillConfig
from .meta_arch import STUDENT_FIXED_ARGS, count_parameters

_DROP_CFG_KEYS = ("hf_hub_id", "architecture", "tag", "source", "file", "license", "url", "custom_load")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def safetensors_bytes(state: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend on the tensors and metadata only.

    The library writes ``__metadata__`` from a hash map, so its key order (and the
    file's sha256) changes from one process to the next; the header is rewritten
    here as sorted, compact JSON, space-padded to 8 bytes as the format allows.
    """
    raw = save(state, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def hub_config(model: torch.nn.Module, config: DistillConfig) -> Dict[str, Any]:
    """config.json as timm writes it for the Hub, with the preprocessing the student was trained with."""
    model_args = dict(STUDENT_FIXED_ARGS, **config.student.model_args)
    for key, value in model_args.items():
        if not _jsonable(value):
            raise ConfigError(f"student.model_args.{key}", f"{value!r} cannot be written to config.json; register an "
                              "architecture that fixes it (as h0mini.registry does for the SwiGLU layers)")
    pretrained_cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items()
                      if k not in _DROP_CFG_KEYS and _jsonable(v)}
    size = config.crops.global_size
    pretrained_cfg.update(mean=list(config.data.mean), std=list(config.data.std), input_size=[3, size, size],
                          num_classes=0)
    pretrained_cfg.setdefault("interpolation", "bicubic")
    pretrained_cfg.setdefault("crop_pct", 1.0)
    return {
        "architecture": config.student.arch,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": "",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def model_card(model: torch.nn.Module, config: DistillConfig, *, teacher_dim: int, head_source: str,
               data_summary: str, steps: int, world_size: int, final_metrics: Dict[str, float],
               weights_sha256: Optional[str] = None) -> str:
    """The exported folder's README.md: h0mini's model card plus the training recipe and data summary."""
    c = config
    objectives = []
    if c.objective.dinov2 > 0:
        d = c.dinov2
        objectives.append(
            f"- **dinov2** (weight {c.objective.dinov2}): DINO loss on CLS (x{d.dino_weight}), iBOT loss on patch "
            f"tokens (x{d.ibot_weight}), KoLeo (x{d.koleo_weight}); {d.n_prototypes} prototypes, "
            f"{d.centering.replace('_', '-')}, teacher temperature {d.warmup_teacher_temp} -> {d.teacher_temp} over "
            f"{d.warmup_teacher_temp_iters} iterations, student temperature {d.student_temp}; teacher heads: "
            f"{head_source}.")
        if head_source == "random_frozen":
            objectives.append(
                "  The teacher had no DINO/iBOT heads, so its head was randomly initialised and frozen: the student "
                "learns the teacher's Sinkhorn-balanced assignment of crops to random prototypes of its feature space.")
    if c.objective.feature > 0:
        f = c.feature
        objectives.append(
            f"- **feature** (weight {c.objective.feature}): regression of the teacher's CLS (x{f.cls_weight}) and "
            f"patch tokens (x{f.patch_weight}) through a learned projector (dropped at export), "
            f"{f.cosine_weight} x cosine + {f.smooth_l1_weight} x smooth-L1; teacher targets "
            + ("standardised per dimension (running statistics)" if f.target_norm == "standardize" else "raw")
            + (f"; plus {f.relation_weight} x matching of the teacher's within-batch CLS similarities by the "
               "backbone's own CLS." if f.relation_weight else "."))
    k, a, o = c.crops, c.augment, c.optim
    recipe = "\n".join(objectives) + f"""
- Crops: 2 global {k.global_size} px (scale {list(k.global_scale)}), {k.n_local} local {k.local_size} px
  (scale {list(k.local_scale)}); flips {a.hflip}/{a.vflip}, 90-degree rotations {a.rot90}, HED stain jitter
  p={a.hed_jitter} (sigma {a.hed_sigma}), colour jitter p={a.color_jitter}, grayscale p={a.grayscale},
  blur p={list(a.blur_global)} (global) / {a.blur_local} (local).
- Optimiser: AdamW {list(o.betas)}, peak lr {c.lr():.3g} ({o.lr_scaling}, base {o.base_lr}), warm-up {o.warmup_iters}
  iterations then cosine to {o.min_lr}; weight decay {o.weight_decay} -> {o.weight_decay_end} (none on norms and
  biases); layer-wise lr decay {o.layerwise_decay}; gradient clipping {o.clip_grad}; EMA momentum
  {c.ema.momentum} -> {c.ema.momentum_end}.
- Steps: {steps} iterations x global batch {c.train.batch_size} on {world_size} process(es); precision
  {c.train.precision}; seed {c.seed}.

The complete resolved training config is in `training_config.json` beside this card."""
    metrics = ", ".join(f"{key} {value:.4g}" for key, value in final_metrics.items()
                        if key.startswith("loss") and isinstance(value, float))
    teacher = c.teacher.model
    hub = hub_config(model, config)
    return render_model_card(
        {"arch": c.student.arch, "weights_file": SAFETENSORS_NAME, "weights_sha256": weights_sha256},
        {"teacher": f"{teacher} ({teacher_dim}-d)", "student": f"{c.student.arch}, {count_parameters(model):,} parameters",
         "iterations": steps, "global batch": c.train.batch_size, "processes": world_size,
         "h0mini": __version__},
        license="other",
        title=f"{c.student.arch} student distilled from {teacher}",
        description=(
            f"A `{c.student.arch}` ViT ({int(model.num_features)}-d tokens) distilled with `h0mini.distill` from the "
            f"frozen teacher `{teacher}`, following the recipe that produced H0-mini (DINOv2 distillation mode: "
            "frozen teacher; this folder holds an EMA of the student). The licence of these weights follows from "
            "the teacher's licence and from your data's: check both before sharing, and set `license` above."
        ),
        embed_dim=int(model.num_features),
        preprocessing=hub["pretrained_cfg"],
        tags=["knowledge-distillation"],
        extra_sections={
            "Training recipe": recipe,
            "Data": f"{data_summary} (`data.sources`: {', '.join(map(str, c.data.sources)) or '-'}).",
            "Final losses": metrics or "not logged",
        },
    )


def export_student(model: torch.nn.Module, folder: Path, config: DistillConfig, *, teacher_dim: int,
                   head_source: str, data_summary: str, steps: int, world_size: int,
                   final_metrics: Optional[Dict[str, float]] = None) -> Path:
    """Write the folder atomically (built beside it, then renamed into place) and return it.

    Example:
        >>> export_student(ema_model, Path("run/export"), config, teacher_dim=1536, head_source="random_frozen",
        ...                data_summary="43 tiles", steps=1000, world_size=1)
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_folder(folder) as tmp:
        (tmp / SAFETENSORS_NAME).write_bytes(safetensors_bytes(
            state, {"format": "pt", "producer": f"h0mini.distill {__version__}"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(hub_config(model, config), indent=2) + "\n")
        (tmp / "training_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(
            model, config, teacher_dim=teacher_dim, head_source=head_source, data_summary=data_summary, steps=steps,
            world_size=world_size, final_metrics=final_metrics or {},
            weights_sha256=file_sha256(tmp / SAFETENSORS_NAME)))
    return folder
