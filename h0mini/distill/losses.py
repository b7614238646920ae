"""The distillation losses, one job each, written from the DINOv2 recipe (Oquab et al., arXiv 2304.07193).

- ``sinkhorn_knopp``: teacher targets with balanced prototype use; every sum is
  all-reduced, so N ranks compute exactly what one rank would on the global batch.
- ``Centering``: the alternative (softmax of centred logits; EMA centre). The
  centre is ``sum / count`` over the rows that exist, all-reduced: unlike the
  public DINOv2 code it never averages over the padding rows that code adds to
  the masked-patch buffer, and it does not take a mean of per-rank means.
- ``dino_loss`` (CLS, every student crop against the teacher's *other* global
  crops), ``ibot_loss`` (patch tokens at the sampled positions, each image's
  positions averaged, then averaged over images), ``koleo_loss`` (spread of the
  student's CLS on the sphere) and ``feature_loss`` (cosine + smooth-L1 against
  the teacher's tokens, for teachers without heads).
All losses compute in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; the backward pass hands each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = _all_reduce(grad.contiguous().clone())
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The global batch's rows (equal per-rank counts), differentiable: every rank then computes the same loss.

    DDP averages gradients over ranks, and each rank's rows receive the gradient summed
    over ranks, so a loss of the gathered batch gets exactly its one-process gradient.
    """
    return _GatherRows.apply(rows) if _distributed() else rows


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities (B, K) whose rows sum to 1 and whose prototypes are used equally.

    Every rank must call this (with possibly zero rows): the sums are all-reduced.
    The logits are shifted by their global maximum first, which changes nothing
    mathematically but keeps ``exp`` finite for any temperature.
    """
    logits = logits.float()
    peak = logits.max() if logits.numel() else torch.tensor(float("-inf"), device=logits.device)
    peak = _all_reduce(peak.reshape(1).clone(), dist.ReduceOp.MAX if _distributed() else None)
    if not torch.isfinite(peak).all():
        peak = torch.zeros_like(peak)
    q = torch.exp((logits - peak) / temperature).t()  # K x B
    n_prototypes = q.shape[0]
    n_samples = _all_reduce(torch.tensor([float(q.shape[1])], device=q.device))
    tiny = torch.finfo(q.dtype).tiny
    q /= _all_reduce(q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype: total mass 1/K
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample: total mass 1/B
        q /= n_samples
    q *= n_samples
    return q.t()


class Centering(nn.Module):
    """Softmax of centred teacher logits; the centre is an EMA of the global mean logit (a buffer)."""

    def __init__(self, n_prototypes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Probabilities with the current centre, then the centre is updated with these logits."""
        probs = F.softmax((logits.float() - self.center) / temperature, dim=-1)
        self.update(logits)
        return probs

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """centre <- m centre + (1 - m) (sum of rows / number of rows), both summed over ranks."""
        total = _all_reduce(logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor([float(logits.shape[0])], device=logits.device))
        if count.item() > 0:
            self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


class TargetStandardizer(nn.Module):
    """Per-dimension standardisation of teacher features with running mean/variance (buffers, summed over ranks).

    Raw teacher features are dominated by a shared mean and a few large dimensions:
    a cosine target of those is met by predicting the mean, and a short run learns
    little else. Standardised targets weight every dimension's variation alike.
    The statistics start from the first batch and follow an EMA, so a target does
    not depend on the other tiles of its batch once training is under way.
    """

    def __init__(self, dim: int, momentum: float = 0.99, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float64 and centred sums, in two passes over the ranks (the global mean, then squares about
        # it): E[x^2] - E[x]^2 in float32 loses every digit of a small spread about a large mean
        # (mean 300, std 0.05 gave an output std of 25, not 1).
        rows = features.detach().to(torch.float64).reshape(-1, features.shape[-1])
        n = _all_reduce(torch.tensor([float(rows.shape[0])], dtype=torch.float64, device=rows.device))
        mean = _all_reduce(rows.sum(0)) / n
        var = _all_reduce((rows - mean).square().sum(0)) / n
        m = self.momentum if self.count.item() > 0 else 0.0
        self.mean.mul_(m).add_(mean.to(self.mean.dtype), alpha=1 - m)
        self.var.mul_(m).add_(var.to(self.var.dtype), alpha=1 - m)
        self.count.add_(1)
        centred = features.to(torch.float64) - self.mean.to(torch.float64)
        return (centred / (self.var.to(torch.float64) + self.eps).sqrt()).float()


def dino_loss(student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor],
              student_temp: float) -> torch.Tensor:
    """Mean over (student crop, other teacher global crop) pairs of the batch-mean cross-entropy.

    ``student_logits`` lists the global crops first, in the teacher's order, then the
    local crops; a student global crop is never compared with its own teacher crop.
    """
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    terms = 0
    for i, student in enumerate(student_logits):
        log_probs = F.log_softmax(student.float() / student_temp, dim=-1)
        for j, teacher in enumerate(teacher_probs):
            if i == j:
                continue
            total = total + torch.sum(-teacher * log_probs, dim=-1).mean()
            terms += 1
    if terms == 0:
        raise ValueError("dino_loss needs at least two crops")
    return total / terms


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, n_images: int,
              student_temp: float) -> torch.Tensor:
    """Cross-entropy at the sampled positions: (M, K) rows, ``weights`` = 1 / positions of that row's image.

    Summed with those weights and divided by ``n_images`` (all global crops, with or
    without positions), as DINOv2 normalises it.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0  # keeps the graph connected for DDP
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_row = torch.sum(-teacher_probs * log_probs, dim=-1)
    return (per_row * weights).sum() / max(n_images, 1)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator: -mean log(distance to the nearest other row), rows L2-normalised."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def feature_loss(prediction: torch.Tensor, target: torch.Tensor, *, cosine_weight: float, smooth_l1_weight: float,
                 beta: float = 1.0) -> torch.Tensor:
    """cosine_weight x (1 - mean cosine) + smooth_l1_weight x smooth-L1, over the last dimension."""
    prediction, target = prediction.float(), target.float()
    loss = prediction.new_zeros(())
    if cosine_weight:
        loss = loss + cosine_weight * (1.0 - F.cosine_similarity(prediction, target, dim=-1, eps=1e-6).mean())
    if smooth_l1_weight:
        loss = loss + smooth_l1_weight * F.smooth_l1_loss(prediction, target, beta=beta)
    return loss


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two batches' centred cosine-similarity matrices (off the diagonal).

    Similarity-preserving distillation (Tung & Mori, ICCV 2019) on the backbone's own
    features: the projector cannot absorb it, so the student's neighbourhoods, not only
    a linear code of the teacher, must follow the teacher's. Centring over the batch keeps
    a large shared mean (post-ReLU features) from making every pair look alike. Pass the
    global batch (``gather_rows``) so that the loss does not depend on the number of ranks.
    """
    n = student.shape[0]
    if n < 3:
        raise ValueError(f"relation_loss needs at least 3 samples in the batch, got {n}")
    grams = []
    for x in (student.float(), teacher.float()):
        x = F.normalize(x - x.mean(dim=0, keepdim=True), dim=-1, eps=1e-6)
        grams.append(x @ x.t())
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    return (grams[0] - grams[1])[off_diagonal].pow(2).mean()


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """For a (N, P) bool mask, 1 / (positions in the row) for every True entry, in ``masks[masks]`` order."""
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    return (1.0 / counts).expand_as(masks)[masks]


def teacher_probs(logits: torch.Tensor, *, temperature: float, centering: Optional[Centering],
                  sinkhorn_iterations: int) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (``centering is None``) or by centring."""
    if centering is None:
        return sinkhorn_knopp(logits, temperature, sinkhorn_iterations)
    return centering(logits, temperature)
