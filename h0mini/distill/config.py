"""The typed distillation config: defaults, then a YAML file, then ``key=value`` overrides.

Precedence follows DINOv2 (``dinov2/utils/config.py``): the dataclass defaults
below (mirrored, with comments, in ``configs/default.yaml``), then the user's
YAML, then trailing ``section.key=value`` pairs from the command line, whose
values are parsed as YAML (``train.iterations=100``, ``crops.global_scale=[0.4,1]``).
Unknown keys and wrong types fail at once with the dotted name of the field, and
``validate()`` checks everything that can be checked without building a model,
so a bad config never reaches the training loop.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..constants import H_OPTIMUS_0_REPO_ID, MEAN, STD
from ..errors import H0miniError, OptionalDependencyError


class ConfigError(H0miniError, ValueError):
    """A config field has a wrong name, type or value. ``field`` is its dotted name."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"config field {field_name!r}: {message}")
        self.field = field_name

    def __reduce__(self):
        return (_rebuild_config_error, (self.field, str(self).split(": ", 1)[1]))


def _rebuild_config_error(field_name: str, message: str) -> "ConfigError":
    return ConfigError(field_name, message)


@dataclass
class TeacherConfig:
    """The frozen teacher. Public pathology teachers ship a backbone only (no DINO heads)."""

    model: str = H_OPTIMUS_0_REPO_ID  # Hub id, local folder (config.json + weights) or timm model name
    model_args: Dict[str, Any] = field(default_factory=dict)  # timm kwargs (null: timm's default), e.g. for a CNN
    pretrained: bool = True  # timm name: load timm's pretrained weights (from the Hub) unless `weights` is set
    weights: Optional[str] = None  # timm name: a local weights file (.safetensors, or .pth/.bin read weights-only)
    revision: Optional[str] = None  # Hub revision
    heads: Optional[str] = None  # file with the teacher's dino_head/ibot_head weights, if you have them
    missing_heads: str = "random_frozen"  # what "dinov2" does without heads: random_frozen | error
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16


@dataclass
class StudentConfig:
    """The student: an architecture registered with timm plus JSON-serialisable overrides."""

    arch: str = "h0_mini"
    model_args: Dict[str, Any] = field(default_factory=dict)  # e.g. {embed_dim: 384, depth: 12, num_heads: 6}
    init: Optional[str] = None  # optional starting weights (folder or file, as h0mini.load_model reads)
    drop_path_rate: float = 0.0  # distillation mode: no stochastic depth
    grad_checkpointing: bool = False


@dataclass
class ObjectiveConfig:
    """Weights of the two objectives in the total loss; 0 switches one off (its modules are not built)."""

    dinov2: float = 0.0  # the H0-mini recipe; set to 1.0 when you have the teacher's heads (teacher.heads)
    feature: float = 1.0  # the default for public, head-less teachers such as H-optimus-0


@dataclass
class DINOv2Config:
    """DINO (CLS) + iBOT (patches) + KoLeo, with the DINOv2 defaults."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_separate_head: bool = False
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | centering
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_iters: int = 37500
    mask_probability: float = 0.5  # share of global crops that get iBOT positions
    mask_ratio: Tuple[float, float] = (0.1, 0.5)
    freeze_last_layer_iters: int = 1250


@dataclass
class FeatureConfig:
    """Direct regression of teacher tokens through a learned projector (needs no heads)."""

    cls_weight: float = 1.0
    patch_weight: float = 1.0
    cosine_weight: float = 0.9
    smooth_l1_weight: float = 0.1
    smooth_l1_beta: float = 1.0
    projector_hidden_dim: int = 2048  # 0: a single linear layer
    target_norm: str = "none"  # none (raw teacher features) | standardize (per dimension, running stats)
    relation_weight: float = 1.0  # batch similarity matching of the backbone CLS (no projector); 0: off


@dataclass
class CropsConfig:
    global_size: int = 224
    global_scale: Tuple[float, float] = (0.32, 1.0)
    n_local: int = 8
    local_size: int = 98
    local_scale: Tuple[float, float] = (0.05, 0.32)


@dataclass
class AugmentConfig:
    """Per-crop photometric and geometric augmentation (probabilities are probabilities to apply)."""

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    hed_jitter: float = 0.5
    hed_sigma: float = 0.05
    color_jitter: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    grayscale: float = 0.1
    blur_global: Tuple[float, float] = (1.0, 0.1)  # first and second global crop
    blur_local: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_global2: float = 0.0


@dataclass
class DataConfig:
    sources: List[str] = field(default_factory=list)  # folders, .txt list files, tar shard patterns
    mean: Tuple[float, float, float] = MEAN
    std: Tuple[float, float, float] = STD
    num_workers: int = 8
    shuffle: bool = True


@dataclass
class OptimConfig:
    base_lr: float = 4e-3
    lr_scaling: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | none
    min_lr: float = 1e-6
    warmup_iters: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # 0 disables
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2


@dataclass
class EMAConfig:
    momentum: float = 0.994
    momentum_end: float = 1.0


@dataclass
class TrainConfig:
    iterations: int = 125000
    batch_size: int = 1024  # global, over all ranks
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 1250
    keep_last: int = 3
    resume: bool = True
    max_run_steps: Optional[int] = None  # stop this launch after N steps (job time limits); resume later
    log_every: int = 10
    tensorboard: bool = False
    export_dir: Optional[str] = None  # default: <output_dir>/export


@dataclass
class DistillConfig:
    output_dir: str = "distill-run"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def lr(self) -> float:
        """Peak learning rate after DINOv2's scaling rule: base_lr x sqrt(batch / 1024)."""
        if self.optim.lr_scaling == "sqrt_wrt_1024":
            return self.optim.base_lr * math.sqrt(self.train.batch_size / 1024.0)
        return self.optim.base_lr

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- building from dicts


def _yaml():
    try:
        import yaml
    except ImportError as error:
        raise OptionalDependencyError("pyyaml", extra="distill", feature="h0mini.distill configs") from error
    return yaml


def from_dict(data: Mapping[str, Any], base: Optional[DistillConfig] = None) -> DistillConfig:
    """Merge a nested dict into ``base`` (default: the defaults), checking names and types."""
    config = base if base is not None else DistillConfig()
    _merge(config, data, "")
    return config


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(name, f"unknown key; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, name + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(name, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, List):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(name, f"unsupported type {hint!r}")  # pragma: no cover - a bug in this file


def parse_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    """``["train.iterations=10", "data.sources=[a,b]"]`` -> nested dict; values parsed as YAML."""
    yaml = _yaml()
    nested: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, "a command-line override must look like section.key=value")
        key, text = pair.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(key, f"cannot parse {text!r}: {error}") from error
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "overrides both a value and a section")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Defaults, then the YAML file at ``path``, then the ``key=value`` overrides; validated."""
    config = DistillConfig()
    if path is not None:
        yaml = _yaml()
        file = Path(path)
        if not file.is_file():
            raise ConfigError("--config", f"no such file: {str(file)!r}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError("--config", f"{str(file)!r} is not valid YAML: {error}") from None
        from_dict(data, config)
    from_dict(parse_overrides(overrides), config)
    validate(config)
    return config


def save_config(config: DistillConfig, path: Path) -> None:
    """Write the resolved config (with the scaled lr as a comment) beside the checkpoints."""
    yaml = _yaml()
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    header = f"# Resolved h0mini.distill config. Peak lr after scaling: {config.lr():.6g}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + text)
    tmp.replace(path)


# ---------------------------------------------------------------- validation

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(name, message)


def _range(pair: Tuple[float, float], name: str, low: float, high: float) -> None:
    _check(low <= pair[0] <= pair[1] <= high, name, f"need {low} <= min <= max <= {high}, got {list(pair)}")


def _prob(value: float, name: str) -> None:
    _check(0.0 <= value <= 1.0, name, f"a probability must lie in [0, 1], got {value}")


def validate(config: DistillConfig) -> None:
    """Every check that needs no model or data (those follow in ``validate_models`` and the data module)."""
    c = config
    _check(c.objective.dinov2 >= 0 and c.objective.feature >= 0, "objective", "weights must be >= 0")
    _check(c.objective.dinov2 > 0 or c.objective.feature > 0, "objective", "at least one objective weight must be > 0")
    _check(c.teacher.missing_heads in ("random_frozen", "error"), "teacher.missing_heads",
           f"use 'random_frozen' or 'error', got {c.teacher.missing_heads!r}")
    _check(c.teacher.precision in _PRECISIONS, "teacher.precision", f"use one of {_PRECISIONS}")
    _check(c.train.precision in ("auto", "fp32", "bf16"), "train.precision", "use auto, fp32 or bf16")
    _check(c.train.device in ("auto", "cpu", "cuda"), "train.device", "use auto, cpu or cuda")
    _check(bool(c.teacher.model), "teacher.model", "name a teacher (Hub id, folder or timm name)")
    _check(bool(c.student.arch), "student.arch", "name a student architecture")
    _check(0.0 <= c.student.drop_path_rate < 1.0, "student.drop_path_rate", "must lie in [0, 1)")
    for section, args in (("student", c.student.model_args), ("teacher", c.teacher.model_args)):
        for key, value in args.items():
            # `{embed_dim:24}` (no space) is YAML for the key "embed_dim:24" with no value: timm would
            # silently drop it and train the default model. A teacher's `{dynamic_img_size: null}` is
            # a real key asking for timm's default; the student's are written to config.json, so need values.
            _check(isinstance(key, str) and key.isidentifier(), f"{section}.model_args",
                   f"{key!r} is not a keyword argument (YAML needs a space after the colon: {{embed_dim: 384}})")
            _check(value is not None or section == "teacher", f"{section}.model_args",
                   f"{key!r} has no value: give one (YAML needs a space after the colon: {{embed_dim: 384}})")
    d = c.dinov2
    if c.objective.dinov2 > 0:
        _check(d.centering in ("sinkhorn_knopp", "centering"), "dinov2.centering",
               f"use 'sinkhorn_knopp' or 'centering', got {d.centering!r}")
        for key in ("n_prototypes", "hidden_dim", "bottleneck_dim", "nlayers", "sinkhorn_iterations"):
            _check(getattr(d, key) >= 1, f"dinov2.{key}", "must be >= 1")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _check(getattr(d, key) > 0, f"dinov2.{key}", "a temperature must be > 0")
        _check(0.0 <= d.center_momentum < 1.0, "dinov2.center_momentum", "must lie in [0, 1)")
        _check(d.warmup_teacher_temp_iters >= 0, "dinov2.warmup_teacher_temp_iters", "must be >= 0")
        _check(d.freeze_last_layer_iters >= 0, "dinov2.freeze_last_layer_iters", "must be >= 0")
        _prob(d.mask_probability, "dinov2.mask_probability")
        _range(d.mask_ratio, "dinov2.mask_ratio", 0.0, 1.0)
        _check(d.dino_weight >= 0 and d.ibot_weight >= 0 and d.koleo_weight >= 0, "dinov2", "term weights must be >= 0")
        _check(d.dino_weight + d.ibot_weight > 0, "dinov2.dino_weight",
               "dino_weight and ibot_weight cannot both be 0 with objective.dinov2 > 0 (the head would get no gradient)")
    f = c.feature
    if c.objective.feature > 0:
        _check(f.cls_weight >= 0 and f.patch_weight >= 0 and f.cls_weight + f.patch_weight > 0, "feature",
               "cls_weight and patch_weight must be >= 0, not both 0")
        _check(f.cosine_weight >= 0 and f.smooth_l1_weight >= 0 and f.cosine_weight + f.smooth_l1_weight > 0,
               "feature", "cosine_weight and smooth_l1_weight must be >= 0, not both 0")
        _check(f.smooth_l1_beta > 0, "feature.smooth_l1_beta", "must be > 0")
        _check(f.projector_hidden_dim >= 0, "feature.projector_hidden_dim", "must be >= 0 (0 = linear)")
        _check(f.relation_weight >= 0, "feature.relation_weight", "must be >= 0")
        # the batch is gathered over ranks, so the global batch counts: 2 tiles give 4 global crops
        _check(f.relation_weight == 0 or c.train.batch_size >= 2, "train.batch_size",
               "feature.relation_weight compares the tiles of a batch with each other: use train.batch_size >= 2 "
               "or feature.relation_weight=0")
        _check(f.target_norm in ("standardize", "none"), "feature.target_norm",
               f"{f.target_norm!r} is not one of standardize, none")
    k = c.crops
    _check(k.global_size > 0, "crops.global_size", "must be > 0")
    _check(k.n_local >= 0, "crops.n_local", "must be >= 0")
    if k.n_local:
        _check(0 < k.local_size <= k.global_size, "crops.local_size", "must lie in (0, crops.global_size]")
    _range(k.global_scale, "crops.global_scale", 1e-4, 1.0)
    _range(k.local_scale, "crops.local_scale", 1e-4, 1.0)
    a = c.augment
    for key in ("hflip", "vflip", "hed_jitter", "color_jitter", "grayscale", "blur_local", "solarize_global2"):
        _prob(getattr(a, key), f"augment.{key}")
    for i, p in enumerate(a.blur_global):
        _prob(p, f"augment.blur_global[{i}]")
    _range(a.blur_sigma, "augment.blur_sigma", 1e-6, 100.0)
    _check(a.hed_sigma >= 0, "augment.hed_sigma", "must be >= 0")
    for key in ("brightness", "contrast", "saturation"):
        _check(getattr(a, key) >= 0, f"augment.{key}", "must be >= 0")
    _check(0 <= a.hue <= 0.5, "augment.hue", "must lie in [0, 0.5]")
    _check(len(c.data.sources) > 0, "data.sources", "list at least one tile folder, list file or tar shard pattern")
    _check(all(s > 0 for s in c.data.std), "data.std", "must be > 0")
    _check(c.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    o = c.optim
    _check(o.base_lr > 0, "optim.base_lr", "must be > 0")
    _check(o.lr_scaling in ("sqrt_wrt_1024", "none"), "optim.lr_scaling", "use sqrt_wrt_1024 or none")
    _check(0 <= o.min_lr <= c.lr(), "optim.min_lr", "must lie in [0, peak lr]")
    _check(o.warmup_iters >= 0, "optim.warmup_iters", "must be >= 0")
    _check(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "must be >= 0")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", "must lie in [0, 1)")
    _check(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables)")
    _check(0 < o.layerwise_decay <= 1, "optim.layerwise_decay", "must lie in (0, 1]")
    _check(o.patch_embed_lr_mult >= 0, "optim.patch_embed_lr_mult", "must be >= 0")
    _check(0 <= c.ema.momentum <= c.ema.momentum_end <= 1, "ema.momentum", "need 0 <= momentum <= momentum_end <= 1")
    t = c.train
    _check(t.iterations >= 1, "train.iterations", "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.max_run_steps is None or t.max_run_steps >= 1, "train.max_run_steps", "must be >= 1 or null")


def validate_world(config: DistillConfig, world_size: int) -> int:
    """Check the batch splits evenly over ranks; return the per-rank batch."""
    _check(config.train.batch_size % world_size == 0, "train.batch_size",
           f"the global batch {config.train.batch_size} must divide evenly over {world_size} ranks")
    local = config.train.batch_size // world_size
    if config.objective.dinov2 > 0 and config.dinov2.koleo_weight > 0:
        _check(local >= 2, "train.batch_size", f"KoLeo needs >= 2 tiles per rank, got {local}")
    return local


def short_run_warnings(config: DistillConfig) -> List[str]:
    """Settings made for 100k-step runs that leave a short run near its initialisation, each with its fix.

    From issue 16's runs with an EfficientNet-Lite0 teacher on a few hundred tiles: a
    warm-up longer than the run keeps the lr ramping to its end, DINOv2's
    sqrt(batch / 1024) rule gives a small batch a tiny lr, a slow EMA exports weights
    still close to the random init. ``benchmarks/distill_proof.py`` measures the outcome
    (README).
    """
    c, warnings = config, []
    n = c.train.iterations
    if c.optim.warmup_iters >= n:
        warnings.append(f"optim.warmup_iters={c.optim.warmup_iters} >= train.iterations={n}: the lr ramps up for "
                        f"the whole run; set optim.warmup_iters to about {max(1, n // 10)}")
    if c.lr() < 1e-3 and n <= 5000:
        warnings.append(f"peak lr {c.lr():.2g} ({c.optim.lr_scaling} at batch {c.train.batch_size}) is small for "
                        f"{n} steps; set optim.lr_scaling=none and optim.base_lr=1e-3 or more")
    window = 1.0 / max(1e-9, 1.0 - c.ema.momentum)
    if n < 5 * window:
        warnings.append(f"ema.momentum={c.ema.momentum} averages over ~{window:.0f} steps, too slow for {n}: the "
                        f"exported EMA stays near the random init; set ema.momentum to about {1 - 5 / n:.3g} or lower")
    return warnings


def validate_patch_size(config: DistillConfig, patch: int, who: str, local_crops: bool = True) -> None:
    """Crops must tile into whole patches, or the ViT silently drops pixels (the teacher sees global crops only)."""
    k = config.crops
    _check(k.global_size % patch == 0, "crops.global_size",
           f"{k.global_size} is not a multiple of the {who} patch size {patch} (try {max(patch, round(k.global_size / patch) * patch)})")
    if k.n_local and local_crops:
        _check(k.local_size % patch == 0, "crops.local_size",
               f"{k.local_size} is not a multiple of the {who} patch size {patch} (try {max(patch, round(k.local_size / patch) * patch)})")
