"""h0mini.distill losses, heads, masks and schedules against hand-computed values."""

from __future__ import annotations

import math
import os
import random
import socket

import pytest
import numpy as np
import torch
import torch.multiprocessing as mp

from h0mini.distill.heads import DINOHead, head_state_from_checkpoint
from h0mini.distill.losses import (Centering, dino_loss, feature_loss, ibot_loss, koleo_loss, mask_weights,
                                  relation_loss, sinkhorn_knopp)
from h0mini.distill.masking import MaskingGenerator, sample_mask
from h0mini.distill.schedules import CosineSchedule, WarmupConstant
from h0mini.distill.meta_arch import head_from_state


def _xent(p, q):  # sum_k -p_k log q_k
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q))


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_dino_loss_matches_hand_computation():
    # 2 global crops + 1 local crop, one tile, K = 2, student temperature 0.5.
    s = [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]
    t = [[0.9, 0.1], [0.2, 0.8]]
    q = [_softmax([v / 0.5 for v in row]) for row in s]
    # pairs: s0-t1, s1-t0, s2-t0, s2-t1 (a global crop never meets its own teacher crop)
    expected = (_xent(t[1], q[0]) + _xent(t[0], q[1]) + _xent(t[0], q[2]) + _xent(t[1], q[2])) / 4
    got = dino_loss([torch.tensor([row]) for row in s], [torch.tensor([row]) for row in t], 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_weights_each_image_by_its_positions():
    # image 0 has 2 positions, image 1 has 1, image 2 has none: (l0 + l1)/2 + l2, over 3 images.
    masks = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    per_row = [_xent(t[i].tolist(), _softmax((s[i] / 0.1).tolist())) for i in range(3)]
    expected = ((per_row[0] + per_row[1]) / 2 + per_row[2]) / 3
    weights = mask_weights(masks)
    assert weights.tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert ibot_loss(s, t, weights, 3, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_matches_hand_computation():
    # Three unit vectors at 0, 90 and 180 degrees: nearest distances sqrt(2), sqrt(2), sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    # Two near-duplicates are pushed apart: a much larger loss.
    y = torch.tensor([[1.0, 0.0], [1.0, 1e-3], [-1.0, 0.0]])
    assert koleo_loss(y).item() > 3.0


def test_feature_loss_matches_hand_computation():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    cos = 1 - (0.0 + 1.0) / 2
    # smooth-L1, beta 1: |d| < 1 -> d^2 / 2, else |d| - 0.5; diffs 1, -1, 0, 1
    l1 = (0.5 + 0.5 + 0.0 + 0.5) / 4
    got = feature_loss(pred, target, cosine_weight=0.9, smooth_l1_weight=0.1, beta=1.0)
    assert got.item() == pytest.approx(0.9 * cos + 0.1 * l1, rel=1e-6)


def test_relation_loss_matches_hand_computation_and_ignores_scale_offset_and_rotation():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # centred already
    teacher = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    # cosines off the diagonal: student 0, -1/sqrt2, -1/sqrt2; teacher -1, -1, 1
    # squared differences 1, (1 - 1/sqrt2)^2, (1 + 1/sqrt2)^2: mean (1 + 2 + 1) / 3
    assert relation_loss(student, teacher).item() == pytest.approx(4 / 3, rel=1e-6)
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    rows, _ = torch.linalg.qr(torch.randn(32, 8))  # 8 orthonormal columns in 32-d: an isometric embedding
    same_geometry = 3.0 * x @ rows.T + torch.randn(32)  # wider, scaled, rotated, shifted by a shared mean
    assert relation_loss(x, same_geometry).item() < 1e-10
    assert relation_loss(x, torch.randn(16, 32)).item() > 0.01
    with pytest.raises(ValueError, match="at least 3"):
        relation_loss(x[:2], same_geometry[:2])


def test_sinkhorn_knopp_rows_and_columns():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    q = sinkhorn_knopp(logits, temperature=0.5, n_iterations=3)
    assert q.shape == (12, 4)
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 3.0), atol=0.3)  # each prototype: about B / K
    q_many = sinkhorn_knopp(logits, temperature=0.5, n_iterations=200)
    assert torch.allclose(q_many.sum(dim=0), torch.full((4,), 3.0), atol=1e-3)
    assert torch.allclose(q_many.sum(dim=1), torch.ones(12), atol=1e-5)
    # a huge logit scale would overflow exp without the max shift
    assert torch.isfinite(sinkhorn_knopp(logits * 1e3, temperature=0.01)).all()


def test_centering_centre_is_the_mean_of_real_rows():
    center = Centering(3, momentum=0.5)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = center(logits, 1.0)  # uses the old (zero) centre, then updates
    assert torch.allclose(probs, torch.softmax(logits, dim=-1))
    assert center.center[0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # 0.5 * 0 + 0.5 * mean
    center.update(logits[:0])  # no rows (no masked patches anywhere): centre unchanged, not NaN
    assert center.center[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, port: int, logits: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    part = logits[:3] if rank == 0 else logits[3:]  # unequal shares: 3 and 9 rows
    q = sinkhorn_knopp(part, temperature=0.3, n_iterations=3)
    center = Centering(logits.shape[1], momentum=0.0)
    center.update(part)
    torch.save((q, center.center.clone()), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_sinkhorn_and_centre_across_two_ranks_equal_one_rank(tmp_path):
    torch.manual_seed(1)
    logits = torch.randn(12, 5)
    mp.start_processes(_distributed_worker, args=(_free_port(), logits, str(tmp_path)), nprocs=2, start_method="spawn")
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)}
    q = torch.cat([results[0][0], results[1][0]])
    assert torch.allclose(q, sinkhorn_knopp(logits, 0.3, 3), atol=1e-6)
    # The centre is sum / count over all real rows, not the mean of the two ranks' means.
    for rank in (0, 1):
        assert torch.allclose(results[rank][1], logits.mean(0, keepdim=True), atol=1e-6)
    assert not torch.allclose(results[0][1], (logits[:3].mean(0) + logits[3:].mean(0)) / 2, atol=1e-3)


def test_dino_head_is_cosine_over_prototypes_and_loads_dinov2_keys():
    torch.manual_seed(0)
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=6, nlayers=3)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 16)
    assert out.abs().max() <= 1.0 + 1e-5  # L2-normalised bottleneck x unit prototypes
    # A DINOv2 training checkpoint stores teacher.dino_head.* with weight_g of shape (K, 1)
    state = {f"teacher.dino_head.{k}": v * 2 for k, v in head.state_dict().items()}
    state["student.dino_head.mlp.0.weight"] = torch.zeros(1)
    loaded = head_state_from_checkpoint(state, "dino_head")
    other = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=6, nlayers=3)
    other.load_state_dict(loaded)
    assert torch.equal(other.last_layer.weight_g, head.last_layer.weight_g * 2)
    assert other.last_layer.weight_g.requires_grad  # DINOv2 trains the prototype norms (DINO v1 froze them)

    # DINOv2's one-layer head is a bare nn.Linear: keys mlp.weight / mlp.bias
    one = DINOHead(8, 16, bottleneck_dim=6, nlayers=1)
    flat = {k.replace("mlp.0.", "mlp."): v for k, v in one.state_dict().items()}
    rebuilt = head_from_state(head_state_from_checkpoint({f"dino_head.{k}": v for k, v in flat.items()}, "dino_head"))
    x = torch.randn(3, 8)
    assert torch.equal(rebuilt(x), one(x))


def test_block_masks_are_seeded_and_within_ratio():
    grid = (8, 8)
    gen = MaskingGenerator(grid)
    counts = []
    for seed in range(200):
        a = sample_mask(grid, 0.5, (0.1, 0.5), random.Random(seed), gen)
        b = sample_mask(grid, 0.5, (0.1, 0.5), random.Random(seed), gen)
        assert torch.equal(a, b)
        counts.append(int(a.sum()))
    masked = [c for c in counts if c]
    assert 0.35 < len(masked) / len(counts) < 0.65  # mask_probability 0.5
    assert min(masked) >= 1 and max(masked) <= 0.5 * 64 + 1
    # ratios drawn from U(0.1, 0.5): the masked share averages about 0.3 (blocks may fall short of the draw)
    assert 0.22 < np.mean(masked) / 64 < 0.34


def test_schedules_by_iteration():
    s = CosineSchedule(1.0, 0.1, total=10, warmup=2, warmup_start=0.0)
    assert [s[0], s[1]] == pytest.approx([0.0, 0.5])
    assert s[2] == pytest.approx(1.0)
    assert s[9] < 0.2 and s[100] == pytest.approx(0.1)
    assert all(s[i] >= s[i + 1] for i in range(2, 9))
    t = WarmupConstant(0.04, 0.07, warmup=3)
    assert [t[0], t[3], t[1000]] == pytest.approx([0.04, 0.07, 0.07])


def test_parameter_groups_follow_dinov2():
    """Layer-wise lr decay from the head down, patch-embed multiplier, no weight decay on norms, biases
    and LayerScale (DINOv2's rule), and the prototypes marked for freeze_last_layer."""
    from h0mini.distill.config import load_config
    from h0mini.distill.meta_arch import StudentWithHeads, build_student
    from h0mini.distill.train import param_groups

    config = load_config(None, [
        "data.sources=[x]", "student.arch=h0mini_test", "objective.dinov2=1", "objective.feature=1",
        "dinov2.n_prototypes=32", "dinov2.hidden_dim=16", "dinov2.bottleneck_dim=8", "feature.projector_hidden_dim=16",
        "optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2"])
    trainable = StudentWithHeads(config, build_student(config), teacher_dim=48)
    by_name = {n: g for g in param_groups(trainable, config) for n in g["names"]}
    assert len(by_name) == sum(1 for p in trainable.parameters() if p.requires_grad)  # every parameter, once
    depth = len(trainable.student.blocks)  # 2: ids 0 (embeddings), 1-2 (blocks), 3 (final norm)
    assert by_name["student.cls_token"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["student.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    assert by_name["student.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5 ** depth)
    assert by_name["student.blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5)
    assert by_name["student.norm.weight"]["lr_scale"] == by_name["dino_head.mlp.0.weight"]["lr_scale"] == 1.0
    for name in ("student.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight", "dino_head.last_layer.weight_v",
                 "student.cls_token"):  # DINOv2 decays the tokens too
        assert by_name[name]["wd_scale"] == 1.0, name
    for name in ("student.blocks.0.norm1.weight", "student.blocks.0.attn.qkv.bias", "student.blocks.0.ls1.gamma",
                 "dino_head.mlp.0.bias"):
        assert by_name[name]["wd_scale"] == 0.0, name
    assert by_name["dino_head.last_layer.weight_v"]["last_layer"] and by_name["dino_head.last_layer.weight_g"]["last_layer"]
    assert not by_name["dino_head.mlp.0.weight"]["last_layer"]


def test_target_standardizer_whitens_each_dimension_with_running_statistics():
    from h0mini.distill.losses import TargetStandardizer

    torch.manual_seed(0)
    norm = TargetStandardizer(3, momentum=0.5)
    scale, shift = torch.tensor([100.0, 1.0, 0.1]), torch.tensor([5.0, -2.0, 0.0])
    first = torch.randn(256, 3) * scale + shift
    out = norm(first)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    second = norm(torch.randn(4, 8, 3) * scale + shift + 10 * scale)  # patch tokens: (B, N, D)
    assert second.shape == (4, 8, 3)
    torch.testing.assert_close(norm.mean, 0.5 * first.mean(0) + 0.5 * (shift + 10 * scale), atol=0.6 * 100, rtol=0.1)
    assert int(norm.count) == 2


def test_short_run_warnings_name_each_failing_setting_and_its_fix():
    from h0mini.distill.config import load_config, short_run_warnings

    base = ["data.sources=[tiles]", "train.iterations=100", "train.batch_size=8"]
    warnings = short_run_warnings(load_config(None, base))
    assert [w.split("=")[0].split(" ")[0] for w in warnings] == ["optim.warmup_iters", "peak", "ema.momentum"]
    tuned = ["optim.warmup_iters=10", "optim.lr_scaling=none", "optim.base_lr=2e-3", "ema.momentum=0.95"]
    assert short_run_warnings(load_config(None, base + tuned)) == []
