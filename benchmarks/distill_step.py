"""Step-time split of h0mini.distill: teacher forward / student forward+backward / everything else.

The first two are the models' own cost, measured alone on the same crops; "rest" is
what our code adds on top in a full training step (heads, Sinkhorn-Knopp, losses,
projectors, clipping, AdamW, EMA). Data loading (decode + multi-crop) is reported
apart, since DataLoader workers overlap it with compute.

    python benchmarks/distill_step.py                                  # tiny models, CPU, seconds
    python benchmarks/distill_step.py --teacher h_optimus_0 --student h0_mini --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h0mini  # noqa: E402,F401  (registers the architectures)
from h0mini.distill.augment import MultiCrop  # noqa: E402
from h0mini.distill.config import DistillConfig, from_dict  # noqa: E402
from h0mini.distill.data import TileStream, Sources  # noqa: E402
from h0mini.distill.meta_arch import Distiller, STUDENT_FIXED_ARGS, build_student  # noqa: E402
from h0mini.distill.teachers import tokens  # noqa: E402
from h0mini.distill.train import EMA, build_optimizer, param_groups  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) if times else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="h0mini_test", help="timm architecture of the teacher (random weights)")
    parser.add_argument("--teacher-args", default="{}", help="YAML dict of teacher kwargs")
    parser.add_argument("--student", default="h0mini_test")
    parser.add_argument("--student-args", default="{embed_dim: 24, depth: 2, num_heads: 2}")
    parser.add_argument("--objective", default="feature", choices=["feature", "dinov2", "both"])
    parser.add_argument("--batch", type=int, default=32, help="tiles per step (one process)")
    parser.add_argument("--global-size", type=int, default=98)
    parser.add_argument("--local-size", type=int, default=42)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    import yaml

    device = torch.device(args.device)
    config: DistillConfig = from_dict({
        "teacher": {"model": args.teacher, "model_args": yaml.safe_load(args.teacher_args), "pretrained": False},
        "student": {"arch": args.student, "model_args": yaml.safe_load(args.student_args)},
        "objective": {"dinov2": 1.0 if args.objective in ("dinov2", "both") else 0.0,
                      "feature": 1.0 if args.objective in ("feature", "both") else 0.0},
        "dinov2": {"n_prototypes": args.prototypes, "freeze_last_layer_iters": 0},
        "crops": {"global_size": args.global_size, "local_size": args.local_size, "n_local": args.n_local},
        "data": {"sources": ["synthetic"]},
        "train": {"batch_size": args.batch},
    })
    torch.manual_seed(0)
    import timm

    teacher = timm.create_model(args.teacher, **dict(STUDENT_FIXED_ARGS, **config.teacher.model_args)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bf16 = device.type == "cuda"
    teacher.to(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    student = build_student(config)
    distiller = Distiller(config, student, teacher, device, teacher.embed_dim).to(device)
    optimizer = build_optimizer(param_groups(distiller.trainable, config), config)
    ema = EMA(distiller.trainable.student)
    autocast_dtype = torch.bfloat16 if bf16 else None

    # one real multi-crop batch from synthetic tiles (decode excluded: in-memory uint8)
    crop_cfg = config.crops if args.objective != "feature" else dataclasses.replace(config.crops, n_local=0)
    crops = MultiCrop(crop_cfg, config.augment, config.data.mean, config.data.std)  # as build_loader does
    stream = TileStream(Sources(files=["x"], shards=[]), crops, seed=0, rank=0, world_size=1, local_batch=args.batch,
                        start_step=0, end_step=1, shuffle=False,
                        mask_grid=(args.global_size // 14,) * 2 if args.objective != "feature" else None)
    tiles = [(torch.randint(0, 255, (3, 224, 224), dtype=torch.uint8), i, i) for i in range(args.batch)]
    data_s = _time(lambda: stream._collate(0, tiles), torch.device("cpu"), max(2, args.steps // 3), 1)
    batch = stream._collate(0, tiles)
    g = batch["global_crops"].to(device)
    loc = batch["local_crops"].to(device) if "local_crops" in batch else None

    def teacher_only():
        with torch.inference_mode():
            tokens(teacher, g.to(next(teacher.parameters()).dtype))

    def student_only():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = tokens(student, g).float().square().mean()
            if loc is not None and args.objective != "feature":
                out = out + tokens(student, loc).float().square().mean()
        out.backward()
        student.zero_grad(set_to_none=True)

    def full_step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = distiller(batch, distiller.trainable, teacher_temp=0.07, autocast_dtype=autocast_dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(distiller.trainable.parameters(), 3.0)
        optimizer.step()
        ema.update(distiller.trainable.student, 0.999)

    def optimizer_and_ema():  # with the gradients the last full step left
        optimizer.step()
        ema.update(distiller.trainable.student, 0.999)

    # Interleaved, so that load from other processes hits the three parts alike; medians.
    for fn in (teacher_only, student_only, full_step, optimizer_and_ema):
        _time(fn, device, 0, args.warmup)
    samples = {"t": [], "s": [], "f": [], "o": []}
    for _ in range(args.steps):
        for key, fn in (("t", teacher_only), ("s", student_only), ("f", full_step), ("o", optimizer_and_ema)):
            samples[key].append(_time(fn, device, 1, 0))
    t, s, f, o = (statistics.median(samples[k]) for k in ("t", "s", "f", "o"))
    rest = max(f - t - s, 0.0)
    heads = max(rest - o, 0.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"h0mini.distill step split: teacher {args.teacher}, student {args.student} {args.student_args}, "
          f"objective {args.objective}, batch {args.batch}, crops 2x{args.global_size} + {args.n_local}x{args.local_size}, "
          f"{name}, median of {args.steps}")
    print()
    print("| part | ms / step | share of step |")
    print("|---|---:|---:|")
    for label, value in (("teacher forward", t), ("student forward + backward", s), ("rest (our code)", rest),
                         ("  of which heads/projectors + losses (fwd+bwd)", heads),
                         ("  of which AdamW + EMA", min(o, rest))):
        print(f"| {label} | {value * 1e3:.1f} | {value / f:.0%} |")
    print(f"| **full step** | **{f * 1e3:.1f}** | {args.batch / f:.1f} tiles/s |")
    print(f"| data: multi-crop of one batch (CPU, per worker) | {data_s * 1e3:.1f} | {args.batch / data_s:.1f} tiles/s per worker |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
