"""The training loop: DDP, bf16 autocast, gradient clipping, EMA, logs, atomic checkpoints, resume.

What is trained lives in ``meta_arch``; this module only iterates. Iterations,
not epochs, are counted; every schedule is indexed by iteration and the data
stream is a function of (seed, step), so a run killed at any point and launched
again with the same command continues exactly where its last checkpoint stood.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import IncompatibleCheckpointError
from ..version import __version__
from .config import ConfigError, DistillConfig, save_config, short_run_warnings, validate, validate_patch_size, \
    validate_world
from .data import build_loader, resolve_sources
from .meta_arch import Distiller, build_student, count_parameters, patch_size_of, teacher_dtype
from .teachers import as_token_teacher, build_teacher
from .schedules import Schedules

logger = logging.getLogger("h0mini.distill")

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------- distributed


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_world(device: str = "auto") -> World:
    """Read torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK); a plain ``python`` run is rank 0 of 1."""
    rank = int(os.environ.get("RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but no GPU is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=size)
    return World(rank, size, local_rank, dev)


def _barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


# ---------------------------------------------------------------- optimiser


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for the final norm (BEiT/DINOv2 layer-wise decay)."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(trainable: nn.Module, config: DistillConfig) -> List[Dict[str, Any]]:
    """AdamW groups with ``lr_scale`` (layer decay, patch-embed multiplier), ``wd_scale`` and ``last_layer``."""
    o = config.optim
    depth = len(getattr(trainable.student, "blocks", []))
    groups: Dict[Tuple[float, float, bool], Dict[str, Any]] = {}
    for name, param in trainable.named_parameters():
        if not param.requires_grad:
            continue
        lr_scale = 1.0
        if name.startswith("student."):
            sub = name[len("student."):]
            lr_scale = o.layerwise_decay ** (depth + 1 - layer_id(sub, depth))
            if sub.startswith("patch_embed"):
                lr_scale *= o.patch_embed_lr_mult
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name
        last_layer = ".last_layer." in name
        key = (lr_scale, 0.0 if no_decay else 1.0, last_layer)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_scale": key[0], "wd_scale": key[1],
                                        "last_layer": last_layer})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: List[Dict[str, Any]], config: DistillConfig) -> torch.optim.Optimizer:
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(clean, lr=config.lr(), betas=tuple(config.optim.betas), weight_decay=0.0)


# ---------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of the student backbone: the model that gets exported."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        ema = list(self.model.parameters())
        live = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, live, alpha=1.0 - momentum)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# ---------------------------------------------------------------- checkpoints


class Checkpointer:
    """``checkpoints/step_XXXXXXXX.pt`` written to a temp file, fsynced, renamed; keeps the last N."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = folder
        self.keep_last = keep_last

    def paths(self) -> List[Path]:
        return sorted(self.folder.glob("step_*.pt"))

    def remove_stale_temp_files(self) -> None:
        """Half-written ``.step_*.pt.PID.tmp`` files of a run that was killed mid-save (rank 0 is the only writer)."""
        for stale in self.folder.glob(".step_*.pt.*.tmp"):
            logger.info("removing %s, left by an interrupted save", stale)
            stale.unlink(missing_ok=True)

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in self.paths()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path


# What a relaunch may change: where and how often it writes, how long it runs, where tiles are read from.
RELAUNCH_MAY_CHANGE = ("output_dir", "train.resume", "train.max_run_steps", "train.log_every",
                       "train.checkpoint_every", "train.keep_last", "train.tensorboard", "train.export_dir",
                       "train.device", "data.num_workers", "data.sources")


def check_resumable(saved: Dict[str, Any], config: DistillConfig, path: Path) -> None:
    """A resumed run must be the run that was saved: any other change would silently alter it."""
    before, now = _flatten(saved), _flatten(config.to_dict())
    for key in sorted(set(before) | set(now)):
        if key in RELAUNCH_MAY_CHANGE or before.get(key) == now.get(key):
            continue
        raise ConfigError(key, f"the checkpoint {str(path)!r} was made with {key}={before.get(key)!r}, this launch "
                          f"says {now.get(key)!r}: relaunch with the saved setting (see config.yaml beside it) or "
                          "start a new run in another output_dir")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as plain Python lists (they travel through all_gather_object and weights_only)."""
    np_state = np.random.get_state()
    state = {"torch": torch.random.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------- logging


class MetricLog:
    """Rank 0: JSON lines in ``metrics.jsonl``, a console line every ``log_every`` steps, optional TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Optional[Path]):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                from ..errors import OptionalDependencyError

                raise OptionalDependencyError("tensorboard", extra="distill", feature="train.tensorboard") from error
            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drop_records_after(path: Path, step: int) -> None:
    """Keep ``metrics.jsonl`` one record per step: lines past the step a run resumes from are replayed, so drop them."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut by a kill: its step will be logged again
            continue
        kept.append(line)
    if len(kept) != len(lines):
        logger.info("%s: dropped %d record(s) past step %d, which this run repeats", path.name,
                    len(lines) - len(kept), step)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- the run


@dataclass
class TrainResult:
    step: int  # iterations completed
    finished: bool  # reached train.iterations (and exported)
    export_dir: Optional[Path]
    last_metrics: Dict[str, float]
    interrupted: bool = False


class _StopFlag:
    """Set by SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, exit (preemptible clusters)."""

    def __init__(self):
        self.raised: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = signum
        logger.warning("signal %d received: checkpointing after this step, then stopping", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: DistillConfig, *, teacher: Optional[nn.Module] = None) -> TrainResult:
    """Distil ``config.teacher`` (or the given module) into the student; return where it stopped.

    Args:
        config: a validated config (``load_config``).
        teacher: an ``nn.Module`` to use instead of ``config.teacher.model`` (timm-style:
            ``forward_features`` returning tokens, ``patch_embed.patch_size``, ``num_prefix_tokens``).

    Returns:
        ``TrainResult``; when finished, ``export_dir`` holds config.json + model.safetensors + README.md.

    Raises:
        ConfigError: a field is inconsistent with the data or the models (named in the message).
    """
    validate(config)
    world = setup_world(config.train.device)
    try:
        return _train(config, world, teacher)
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: DistillConfig, world: World, teacher_module: Optional[nn.Module]) -> TrainResult:
    c = config
    out_dir = Path(c.output_dir)
    local_batch = validate_world(c, world.size)
    sources = resolve_sources(c.data.sources)
    if sources.kind == "files" and len(sources.files) < c.train.batch_size:
        logger.warning("only %d tiles for a global batch of %d: tiles repeat within a step", len(sources.files),
                       c.train.batch_size)

    torch.manual_seed(c.seed)  # identical initial weights on every rank and for every world size
    student = build_student(c)
    patch = patch_size_of(student)
    validate_patch_size(c, patch, "student")
    teacher = build_teacher(c, teacher_module)
    teacher.to(world.device, dtype=teacher_dtype(c, world.device))
    teacher, teacher_dim = as_token_teacher(teacher, c, world.device)
    distiller = Distiller(c, student, teacher, world.device, teacher_dim).to(world.device)
    trainable = distiller.trainable
    ema = EMA(trainable.student)
    seed_everything(c.seed + world.rank)

    groups = param_groups(trainable, c)
    optimizer = build_optimizer(groups, c)
    schedules = Schedules.from_config(c)
    autocast_dtype = None
    if c.train.precision == "bf16" or (c.train.precision == "auto" and world.device.type == "cuda"):
        autocast_dtype = torch.bfloat16

    checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, c.train.keep_last)
    start_step = 0
    if not c.train.resume and checkpointer.paths():
        raise ConfigError("train.resume", f"{str(checkpointer.folder)!r} holds checkpoints of an earlier run, which "
                          "would mix with this one's: resume it (train.resume=true), choose another output_dir, "
                          "or delete that folder")
    if world.main:
        checkpointer.remove_stale_temp_files()
    if c.train.resume and checkpointer.paths():
        start_step = _resume(checkpointer, distiller, ema, optimizer, world, c)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        drop_records_after(out_dir / METRICS_FILE, start_step)
        for warning in short_run_warnings(c):
            logger.warning("short run: %s", warning)
        save_config(c, out_dir / CONFIG_FILE)
        logger.info("teacher %s (%d-d, %s params, heads: %s), student %s (%s params, %d-d), %s, %d rank(s) x %d tiles",
                    c.teacher.model if teacher_module is None else type(teacher_module).__name__, teacher_dim,
                    f"{count_parameters(teacher):,}", distiller.head_source, c.student.arch,
                    f"{count_parameters(student):,}", student.embed_dim, sources.summary(), world.size, local_batch)

    model: nn.Module = trainable
    if world.size > 1:
        model = nn.parallel.DistributedDataParallel(
            trainable, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            broadcast_buffers=False)

    loader = build_loader(c, sources, rank=world.rank, world_size=world.size, local_batch=local_batch,
                          start_step=start_step, patch_size=patch, pin_memory=world.device.type == "cuda")
    metrics = MetricLog(out_dir / METRICS_FILE, out_dir / "tensorboard" if c.train.tensorboard else None) \
        if world.main else None
    progress = None
    if world.main and sys.stderr.isatty():
        from tqdm.auto import tqdm

        progress = tqdm(total=c.train.iterations, initial=start_step, file=sys.stderr, unit="it", dynamic_ncols=True)

    step = start_step
    stop_at = c.train.iterations
    if c.train.max_run_steps is not None:
        stop_at = min(stop_at, start_step + c.train.max_run_steps)
    last: Dict[str, float] = {}
    window = {"data": 0.0, "teacher": 0.0, "student": 0.0, "total": 0.0, "steps": 0}
    interrupted = False
    trainable.train()
    with _StopFlag() as stop:
        data_iter = iter(loader)
        tick = time.perf_counter()
        while step < stop_at:
            batch = next(data_iter)
            if int(batch["step"]) != step:  # the stream is a function of the step: a mismatch is a bug
                raise RuntimeError(f"data stream out of step: got {int(batch['step'])}, expected {step}")
            t_data = time.perf_counter()
            lr, wd = schedules.lr[step], schedules.weight_decay[step]
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
                group["weight_decay"] = wd * group["wd_scale"]
            timings: Dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            loss, terms = distiller(batch, model, teacher_temp=schedules.teacher_temp[step],
                                    autocast_dtype=autocast_dtype, timings=timings)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (terms: {terms}); "
                                         "lower optim.base_lr or check the data")
            loss.backward()
            if step < schedules.freeze_last_layer_iters:
                for group in optimizer.param_groups:
                    if group["last_layer"]:
                        for p in group["params"]:
                            p.grad = None
            grad_norm = float("nan")
            if c.optim.clip_grad > 0:  # per module, as DINOv2: a 65k-prototype head must not set the backbone's scale
                norms = [nn.utils.clip_grad_norm_(module.parameters(), c.optim.clip_grad)
                         for module in trainable.children()]
                grad_norm = float(norms[0])  # the student backbone's
            optimizer.step()
            ema.update(trainable.student, schedules.ema_momentum[step])
            if world.device.type == "cuda":
                torch.cuda.synchronize(world.device)
            now = time.perf_counter()
            window["data"] += t_data - tick
            window["teacher"] += timings.get("teacher", 0.0)
            window["total"] += now - tick
            window["steps"] += 1
            tick = now
            step += 1
            if progress is not None:
                progress.update(1)
            if step % c.train.log_every == 0 or step == stop_at:
                last = _log(step, loss, terms, lr, wd, grad_norm, schedules, window, c, world, metrics, progress)
                window = {k: 0.0 for k in window}
                tick = time.perf_counter()
            interrupted = _any_rank(world, stop.raised is not None)  # every rank joins the all-reduce
            if step % c.train.checkpoint_every == 0 or step == stop_at or interrupted:
                _save_checkpoint(checkpointer, step, distiller, ema, optimizer, world, c)
            if interrupted:
                break
    if progress is not None:
        progress.close()
    if metrics is not None:
        metrics.close()
    finished = step >= c.train.iterations
    export_dir = None
    if finished:
        export_dir = Path(c.train.export_dir) if c.train.export_dir else out_dir / "export"
        if world.main:
            from .export import export_student

            export_student(ema.model, export_dir, c, teacher_dim=teacher_dim, head_source=distiller.head_source,
                           data_summary=sources.summary(), steps=step, world_size=world.size, final_metrics=last)
            logger.info("exported the EMA student to %s", export_dir)
        _barrier(world)
    elif world.main:
        logger.info("stopped at step %d of %d; launch the same command again to resume", step, c.train.iterations)
    return TrainResult(step=step, finished=finished, export_dir=export_dir, last_metrics=last,
                       interrupted=interrupted)


def _any_rank(world: World, flag: bool) -> bool:
    if world.size == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _log(step: int, loss: torch.Tensor, terms: Dict[str, float], lr: float, wd: float, grad_norm: float,
         schedules: Schedules, window: Dict[str, float], c: DistillConfig, world: World,
         metrics: Optional[MetricLog], progress) -> Dict[str, float]:
    names = sorted(terms)
    values = torch.tensor([float(loss.detach())] + [terms[n] for n in names], device=world.device, dtype=torch.float64)
    if world.size > 1:  # averaged over ranks for logging only
        dist.all_reduce(values)
        values /= world.size
    steps = max(window["steps"], 1)
    step_time = window["total"] / steps
    record: Dict[str, Any] = {"step": step, "loss": values[0].item()}
    record.update({f"loss_{n}": values[i + 1].item() for i, n in enumerate(names)})
    record.update({
        "lr": lr, "weight_decay": wd, "teacher_temp": schedules.teacher_temp[step - 1],
        "ema_momentum": schedules.ema_momentum[step - 1], "grad_norm": grad_norm,
        "tiles_per_s": c.train.batch_size / step_time if step_time > 0 else float("nan"),
        "step_s": step_time, "data_s": window["data"] / steps, "teacher_s": window["teacher"] / steps,
        "memory_gib": memory_gib(world.device), "eta_s": step_time * (c.train.iterations - step),
    })
    if world.main:
        if metrics is not None:
            metrics.write(record)
        message = (f"step {step}/{c.train.iterations} loss {record['loss']:.4f} "
                   + " ".join(f"{n} {record['loss_' + n]:.4f}" for n in names)
                   + f" lr {lr:.3g} {record['tiles_per_s']:.1f} tiles/s mem {record['memory_gib']:.2f} GiB "
                   f"eta {_eta(record['eta_s'])}")
        if progress is not None:
            progress.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
            progress.write(message, file=sys.stderr)
        else:
            logger.info(message)
    return record


def _save_checkpoint(checkpointer: Checkpointer, step: int, distiller: Distiller, ema: EMA,
                     optimizer: torch.optim.Optimizer, world: World, c: DistillConfig) -> None:
    states = [rng_state()]
    if world.size > 1:
        states = [None] * world.size
        dist.all_gather_object(states, rng_state())
    if world.main:
        state = {
            "step": step,
            "trainable": distiller.trainable.state_dict(),
            "ema": ema.model.state_dict(),
            "teacher_heads": {name: head.state_dict() for name, head in
                              (("dino_head", distiller.teacher_dino_head), ("ibot_head", distiller.teacher_ibot_head))
                              if head is not None},
            "centers": {name: getattr(distiller, name).state_dict() for name in STATEFUL_LOSS_PARTS
                        if getattr(distiller, name, None) is not None},
            "optimizer": optimizer.state_dict(),
            "rng": states,
            "world_size": world.size,
            "num_workers": c.data.num_workers,
            "config": c.to_dict(),
            "h0mini_version": __version__,
        }
        path = checkpointer.save(step, state)
        logger.info("checkpoint %s", path)
    _barrier(world)


# Loss modules with running state (buffers) that a resumed run must continue from.
STATEFUL_LOSS_PARTS = ("dino_center", "ibot_center", "cls_target_norm", "patch_target_norm")
CHECKPOINT_KEYS = ("step", "trainable", "ema", "optimizer", "rng", "config")


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint's state, loaded as tensors and plain data only (never unpickling code).

    Raises:
        IncompatibleCheckpointError: the file is truncated, not a torch file, holds objects
            other than tensors and plain data (a pickle that would run code), or lacks a key.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zipfile, EOF, UnpicklingError...: torch raises many kinds for a bad file
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise IncompatibleCheckpointError(f"{str(path)!r} cannot be read as a training checkpoint "
                                          f"({type(error).__name__}: {reason})") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise IncompatibleCheckpointError(f"{str(path)!r} is not an h0mini.distill checkpoint (missing {missing})")
    return state


def _resume(checkpointer: Checkpointer, distiller: Distiller, ema: EMA, optimizer: torch.optim.Optimizer,
            world: World, c: DistillConfig) -> int:
    """Load the newest checkpoint that reads; a damaged newer one is skipped with a warning naming it."""
    skipped = []
    for path in reversed(checkpointer.paths()):
        try:
            state = read_checkpoint(path)
        except IncompatibleCheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", path, error)
            skipped.append(path.name)
            continue
        return _load_checkpoint(path, state, distiller, ema, optimizer, world, c)
    raise IncompatibleCheckpointError(
        f"no intact checkpoint in {str(checkpointer.folder)!r} ({', '.join(skipped)} could not be read): move them "
        "away to start over (train.resume=false needs an empty folder), or choose another output_dir")


def _load_checkpoint(path: Path, state: Dict[str, Any], distiller: Distiller, ema: EMA,
                     optimizer: torch.optim.Optimizer, world: World, c: DistillConfig) -> int:
    check_resumable(state.get("config", {}), c, path)
    distiller.trainable.load_state_dict(state["trainable"])
    ema.model.load_state_dict(state["ema"])
    for name, head_state in state.get("teacher_heads", {}).items():
        getattr(distiller, f"teacher_{name}").load_state_dict(head_state)
    for name, center_state in state.get("centers", {}).items():
        getattr(distiller, name).load_state_dict(center_state)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("world_size") == world.size and len(state["rng"]) == world.size:
        set_rng_state(state["rng"][world.rank])
    else:
        logger.warning("resuming on %d ranks from a %s-rank checkpoint: RNG states reseeded",
                       world.size, state.get("world_size"))
    if state.get("num_workers") != c.data.num_workers:
        logger.warning("data.num_workers changed (%s -> %s): shard streams will not replay exactly",
                       state.get("num_workers"), c.data.num_workers)
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
