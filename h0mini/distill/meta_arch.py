"""Teacher, student, heads and losses in one place (DINOv2's ``ssl_meta_arch``); ``train.py`` only loops.

Teachers without heads. Public pathology teachers (H-optimus-0/1, UNI, Virchow...)
ship their backbone only, but DINO/iBOT targets are the teacher's *head* outputs.
Three strategies, from strongest to weakest evidence:

1. ``teacher.heads`` + ``objective.dinov2``: the teacher's own DINO/iBOT heads from
   its training checkpoint. This is how H0-mini was made (Bioptimus had
   H-optimus-0's heads).
2. ``objective.feature`` (the default): regress the teacher's CLS and patch tokens
   directly through a learned projector, cosine + smooth-L1, RADIO-style. It needs
   no heads; the projector is dropped at export. A relation term
   (``feature.relation_weight``) makes the backbone CLS itself match the teacher's
   within-batch similarities: the projector alone let the student carry a linear
   code of the teacher without its neighbourhoods (README, distillation proof).
3. ``objective.dinov2`` without heads, ``teacher.missing_heads: random_frozen``: the
   teacher head is a randomly initialised DINO head, frozen, identical on every
   rank (seeded by ``seed``). Its prototypes are random directions of the
   teacher's feature space, and with Sinkhorn-Knopp the student learns the
   teacher's balanced assignment of crops to them: a random-projection code of
   the teacher's features. It is a weaker signal than real heads (on the test
   scale it lowered agreement when combined with "feature" at a high lr), so it is
   opt-in, combinable with "feature", and ``missing_heads: error`` refuses it.

The feature objective compares the two global crops only (the teacher runs on
nothing else), so with ``objective.dinov2: 0`` no local crops are made at all.
The student is never masked (distillation mode); iBOT positions only select the
patch tokens compared. The teacher runs under ``inference_mode`` in bf16 on GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleCheckpointError
from .config import ConfigError, DistillConfig
from .heads import DINOHead, FeatureProjector, head_state_from_checkpoint
from .losses import (Centering, TargetStandardizer, dino_loss, feature_loss, gather_rows, ibot_loss, koleo_loss,
                     mask_weights, relation_loss, teacher_probs)
from .teachers import patch_size_attr, prefix_tokens_of, tokens

logger = logging.getLogger(__name__)

# Exported with the student so h0mini.load_model rebuilds it as a token-returning ViT.
STUDENT_FIXED_ARGS = {"num_classes": 0, "global_pool": "", "dynamic_img_size": True}


def patch_size_of(student: nn.Module) -> int:
    patch = patch_size_attr(student)
    if patch is None:
        raise ConfigError("student.arch", f"{type(student).__name__} exposes no patch size (patch_embed.patch_size)")
    return patch


# ---------------------------------------------------------------- building


def build_student(config: DistillConfig) -> nn.Module:
    s = config.student
    if not timm.is_model(s.arch):
        raise ConfigError("student.arch", f"{s.arch!r} is not a timm architecture (e.g. h0_mini, vit_small_patch14_reg4_dinov2)")
    try:
        model = timm.create_model(s.arch, pretrained=False, drop_path_rate=s.drop_path_rate,
                                  **dict(STUDENT_FIXED_ARGS, **s.model_args))
    except TypeError as error:
        raise ConfigError("student.model_args", str(error)) from error
    if not hasattr(model, "forward_features") or not hasattr(model, "patch_embed"):
        raise ConfigError("student.arch", f"{s.arch!r} is not a ViT with forward_features and patch_embed")
    if s.init:
        from ..model import read_state_dict, load_state_dict_strict
        from ..hub import resolve_checkpoint

        checkpoint = resolve_checkpoint(s.init)
        load_state_dict_strict(model, read_state_dict(checkpoint.weights_path), arch_name=s.arch, source=s.init)
    if s.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def teacher_dtype(config: DistillConfig, device: torch.device) -> torch.dtype:
    precision = config.teacher.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_teacher_heads(path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    from ..model import read_state_dict

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("teacher.heads", f"no such file: {path!r}")
    try:
        state = read_state_dict(file)
    except IncompatibleCheckpointError as error:
        raise ConfigError("teacher.heads", str(error)) from error
    heads = {name: head_state_from_checkpoint(state, name) for name in ("dino_head", "ibot_head")}
    if not heads["dino_head"]:
        raise ConfigError("teacher.heads", f"{path!r} holds no 'dino_head.*' tensors")
    return heads


def head_from_state(state: Dict[str, torch.Tensor]) -> DINOHead:
    linear = sorted((k for k in state if k.startswith("mlp.") and k.endswith(".weight")),
                    key=lambda k: int(k.split(".")[1]))
    first, last = state[linear[0]], state[linear[-1]]
    head = DINOHead(first.shape[1], state["last_layer.weight_v"].shape[0], hidden_dim=first.shape[0],
                    bottleneck_dim=last.shape[0], nlayers=len(linear))
    head.load_state_dict(state, strict=True)
    return head


# ---------------------------------------------------------------- the trainable part


class StudentWithHeads(nn.Module):
    """Everything with gradients (what DDP wraps): the student backbone, its DINO/iBOT heads, projectors."""

    def __init__(self, config: DistillConfig, student: nn.Module, teacher_dim: int):
        super().__init__()
        self.student = student
        dim = student.embed_dim
        d = config.dinov2
        self.use_dinov2 = config.objective.dinov2 > 0
        self.use_dino_loss = self.use_dinov2 and d.dino_weight > 0  # the head may exist for iBOT alone
        # DDP needs every parameter in the graph: a head or projector whose loss weight is 0 is not built.
        self.dino_head: Optional[DINOHead] = None
        self.ibot_head: Optional[DINOHead] = None
        self.cls_projector: Optional[FeatureProjector] = None
        self.patch_projector: Optional[FeatureProjector] = None
        if self.use_dinov2:
            ibot_shares_head = d.ibot_weight > 0 and not d.ibot_separate_head
            if d.dino_weight > 0 or ibot_shares_head:
                self.dino_head = DINOHead(dim, d.n_prototypes, d.hidden_dim, d.bottleneck_dim, d.nlayers)
            if d.ibot_separate_head and d.ibot_weight > 0:
                self.ibot_head = DINOHead(dim, d.n_prototypes, d.hidden_dim, d.bottleneck_dim, d.nlayers)
        if config.objective.feature > 0:
            f = config.feature
            if f.cls_weight > 0:
                self.cls_projector = FeatureProjector(dim, teacher_dim, f.projector_hidden_dim)
            if f.patch_weight > 0:
                self.patch_projector = FeatureProjector(dim, teacher_dim, f.projector_hidden_dim)

    def forward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor],
                masks: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        prefix = prefix_tokens_of(self.student)
        out_global = tokens(self.student, global_crops)
        cls_global, patches = out_global[:, 0], out_global[:, prefix:]
        out: Dict[str, torch.Tensor] = {"cls_global": cls_global}
        if self.use_dino_loss:
            cls_all = cls_global
            if local_crops is not None and local_crops.numel():
                cls_all = torch.cat([cls_global, tokens(self.student, local_crops)[:, 0]])
            out["dino_logits"] = self.dino_head(cls_all)
        if self.use_dinov2 and masks is not None:
            head = self.ibot_head if self.ibot_head is not None else self.dino_head
            out["ibot_logits"] = head(patches[masks])
        if self.cls_projector is not None:
            out["cls_pred"] = self.cls_projector(cls_global)
        if self.patch_projector is not None:
            out["patch_pred"] = self.patch_projector(patches)
        return out


@dataclass
class TeacherOutput:
    cls: torch.Tensor
    patches: torch.Tensor  # resized to the student's patch grid when the grids differ


def teacher_normalisation(teacher: nn.Module) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """The (mean, std) the teacher was trained with, from its ``pretrained_cfg`` (a wrapped CNN's
    backbone's); None when it has none."""
    for module in (teacher, getattr(teacher, "backbone", None)):
        cfg = getattr(module, "pretrained_cfg", None)
        if cfg is None:
            continue
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return None


def renormalisation(mean: Sequence[float], std: Sequence[float],
                    teacher: Optional[Tuple[Sequence[float], Sequence[float]]]
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(scale, shift)`` taking crops normalised with ``mean``/``std`` to the teacher's normalisation
    (``x * scale + shift``, per channel), or ``(None, None)`` when they agree or the teacher says none.

    ``(x * std + mean - mean_t) / std_t``: exact, and cheaper than normalising the crops twice.
    """
    if teacher is None:
        logger.info("the teacher has no pretrained_cfg mean/std: it gets the crops normalised with data.mean/std")
        return None, None
    t_mean, t_std = (torch.tensor(v, dtype=torch.float64) for v in teacher)
    s_mean, s_std = torch.tensor(tuple(mean), dtype=torch.float64), torch.tensor(tuple(std), dtype=torch.float64)
    if torch.allclose(t_mean, s_mean, rtol=0, atol=1e-7) and torch.allclose(t_std, s_std, rtol=0, atol=1e-7):
        return None, None
    logger.info("the teacher is normalised with its own mean %s, std %s (the student with data.mean/std)",
                [round(float(v), 6) for v in t_mean], [round(float(v), 6) for v in t_std])
    scale = (s_std / t_std).float().view(1, 3, 1, 1)
    shift = ((s_mean - t_mean) / t_std).float().view(1, 3, 1, 1)
    return scale, shift


class Distiller(nn.Module):
    """Owns teacher, trainable student part, teacher heads and loss state; ``forward`` returns the loss dict."""

    def __init__(self, config: DistillConfig, student: nn.Module, teacher: nn.Module, device: torch.device,
                 teacher_dim: int):
        super().__init__()
        self.config = config
        self.device = device
        self.teacher = teacher
        self.teacher_dim = teacher_dim
        self.student_patch = patch_size_of(student)
        # Crops arrive normalised with data.mean/std (the student's); the teacher sees its own statistics.
        scale, shift = renormalisation(config.data.mean, config.data.std, teacher_normalisation(teacher))
        self.register_buffer("teacher_scale", scale, persistent=False)
        self.register_buffer("teacher_shift", shift, persistent=False)
        self.trainable = StudentWithHeads(config, student, teacher_dim)
        d = config.dinov2
        self.teacher_dino_head: Optional[DINOHead] = None
        self.teacher_ibot_head: Optional[DINOHead] = None
        self.head_source = "none"
        self.cls_target_norm: Optional[TargetStandardizer] = None
        self.patch_target_norm: Optional[TargetStandardizer] = None
        if config.objective.feature > 0 and config.feature.target_norm == "standardize":
            self.cls_target_norm = TargetStandardizer(teacher_dim)
            self.patch_target_norm = TargetStandardizer(teacher_dim)
        if config.objective.dinov2 > 0:
            self._build_teacher_heads(config, teacher_dim)
            use_centering = d.centering == "centering"
            self.dino_center = Centering(d.n_prototypes, d.center_momentum) if use_centering else None
            self.ibot_center = Centering(d.n_prototypes, d.center_momentum) if use_centering else None

    def _build_teacher_heads(self, config: DistillConfig, teacher_dim: int) -> None:
        d = config.dinov2
        if config.teacher.heads:
            states = load_teacher_heads(config.teacher.heads)
            dino = head_from_state(states["dino_head"])
            ibot = head_from_state(states["ibot_head"]) if states["ibot_head"] else None
            for name, head in (("dino_head", dino), ("ibot_head", ibot)):
                if head is None:
                    continue
                if head.in_dim != teacher_dim:
                    raise ConfigError("teacher.heads", f"its {name} takes {head.in_dim}-d input but the teacher "
                                      f"outputs {teacher_dim}-d tokens: the heads belong to another teacher")
                if head.out_dim != d.n_prototypes:
                    raise ConfigError("dinov2.n_prototypes", f"is {d.n_prototypes} but the teacher's {name} has "
                                      f"{head.out_dim} prototypes; set dinov2.n_prototypes={head.out_dim}")
            self.teacher_dino_head, self.teacher_ibot_head = dino, ibot
            self.head_source = f"checkpoint {config.teacher.heads}"
        elif config.teacher.missing_heads == "error":
            raise ConfigError("teacher.heads", "objective 'dinov2' needs the teacher's heads; pass teacher.heads, "
                              "set teacher.missing_heads=random_frozen, or use objective.dinov2=0 with objective.feature")
        else:
            # Same weights on every rank and in every run with this seed, independent of the rank seed.
            state = torch.random.get_rng_state()
            torch.manual_seed(config.seed + 7919)
            self.teacher_dino_head = DINOHead(teacher_dim, d.n_prototypes, d.hidden_dim, d.bottleneck_dim, d.nlayers)
            self.teacher_ibot_head = (DINOHead(teacher_dim, d.n_prototypes, d.hidden_dim, d.bottleneck_dim, d.nlayers)
                                      if d.ibot_separate_head else None)
            torch.random.set_rng_state(state)
            self.head_source = "random_frozen"
        for head in (self.teacher_dino_head, self.teacher_ibot_head):
            if head is not None:
                head.eval()
                for p in head.parameters():
                    p.requires_grad_(False)

    # -- teacher side
    @torch.inference_mode()
    def _teacher_forward(self, global_crops: torch.Tensor) -> TeacherOutput:
        dtype = next(self.teacher.parameters()).dtype
        if self.teacher_scale is not None:
            global_crops = global_crops.float() * self.teacher_scale + self.teacher_shift
        out = tokens(self.teacher, global_crops.to(dtype))
        prefix = prefix_tokens_of(self.teacher)
        cls, patches = out[:, 0], out[:, prefix:]
        grid = global_crops.shape[-1] // self.student_patch
        if patches.shape[1] and patches.shape[1] != grid * grid:  # none: an embedding teacher (CLS only)
            side = int(round(patches.shape[1] ** 0.5))
            patches = patches.reshape(-1, side, side, patches.shape[-1]).permute(0, 3, 1, 2).float()
            patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
            patches = patches.permute(0, 2, 3, 1).reshape(-1, grid * grid, patches.shape[1])
        return TeacherOutput(cls=cls.float(), patches=patches.float())

    @torch.no_grad()
    def _teacher_targets(self, out: TeacherOutput, masks: Optional[torch.Tensor], temp: float
                         ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        d = self.config.dinov2
        with torch.autocast(self.device.type, enabled=False):
            cls_logits = self.teacher_dino_head(out.cls)
            cls_probs = teacher_probs(cls_logits, temperature=temp, centering=self.dino_center,
                                      sinkhorn_iterations=d.sinkhorn_iterations)
            patch_probs = None
            if masks is not None:
                head = self.teacher_ibot_head or self.teacher_dino_head
                patch_logits = head(out.patches[masks])
                patch_probs = teacher_probs(patch_logits, temperature=temp, centering=self.ibot_center,
                                            sinkhorn_iterations=d.sinkhorn_iterations)
        return list(cls_probs.chunk(2)), patch_probs

    # -- both
    def forward(self, batch: Dict[str, torch.Tensor], trainable: nn.Module, *, teacher_temp: float,
                autocast_dtype: Optional[torch.dtype], timings: Optional[Dict[str, float]] = None
                ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss and its terms for one batch; ``trainable`` is ``self.trainable`` or its DDP wrapper."""
        c = self.config
        global_crops = batch["global_crops"].to(self.device, non_blocking=True)
        local_crops = batch.get("local_crops")
        if local_crops is not None:
            local_crops = local_crops.to(self.device, non_blocking=True)
        use_ibot = c.objective.dinov2 > 0 and c.dinov2.ibot_weight > 0 and "masks" in batch
        masks = batch["masks"].to(self.device) if use_ibot else None

        start = time.perf_counter()
        teacher_out = self._teacher_forward(global_crops)
        teacher_out = TeacherOutput(cls=teacher_out.cls.clone(), patches=teacher_out.patches.clone())
        if self.device.type == "cuda" and timings is not None:
            torch.cuda.synchronize(self.device)
        if timings is not None:
            timings["teacher"] = timings.get("teacher", 0.0) + time.perf_counter() - start

        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = trainable(global_crops, local_crops, masks)
        terms: Dict[str, torch.Tensor] = {}
        total = global_crops.new_zeros((), dtype=torch.float32)
        if c.objective.dinov2 > 0:
            d = c.dinov2
            cls_targets, patch_targets = self._teacher_targets(teacher_out, masks, teacher_temp)
            n_global = global_crops.shape[0]
            part = global_crops.new_zeros((), dtype=torch.float32)
            if d.dino_weight:
                student_logits = list(out["dino_logits"][:n_global].chunk(2))
                if out["dino_logits"].shape[0] > n_global:
                    student_logits += list(out["dino_logits"][n_global:].chunk(c.crops.n_local))
                terms["dino"] = dino_loss(student_logits, cls_targets, d.student_temp)
                part = part + d.dino_weight * terms["dino"]
            if masks is not None:
                terms["ibot"] = ibot_loss(out["ibot_logits"], patch_targets, mask_weights(masks), n_global,
                                          d.student_temp)
                part = part + d.ibot_weight * terms["ibot"]
            if d.koleo_weight:
                terms["koleo"] = sum(koleo_loss(x) for x in out["cls_global"].chunk(2))
                part = part + d.koleo_weight * terms["koleo"]
            total = total + c.objective.dinov2 * part
        if c.objective.feature > 0:
            f = c.feature
            part = global_crops.new_zeros((), dtype=torch.float32)
            kw = dict(cosine_weight=f.cosine_weight, smooth_l1_weight=f.smooth_l1_weight, beta=f.smooth_l1_beta)
            cls_target, patch_target = teacher_out.cls, teacher_out.patches
            if self.cls_target_norm is not None:
                cls_target, patch_target = self.cls_target_norm(cls_target), self.patch_target_norm(patch_target)
            if f.cls_weight:
                terms["feature_cls"] = feature_loss(out["cls_pred"], cls_target, **kw)
                part = part + f.cls_weight * terms["feature_cls"]
            if f.patch_weight:
                terms["feature_patch"] = feature_loss(out["patch_pred"], patch_target, **kw)
                part = part + f.patch_weight * terms["feature_patch"]
            if f.relation_weight:
                terms["feature_relation"] = relation_loss(gather_rows(out["cls_global"]), gather_rows(cls_target))
                part = part + f.relation_weight * terms["feature_relation"]
            total = total + c.objective.feature * part
        return total, {k: float(v.detach()) for k, v in terms.items()}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

