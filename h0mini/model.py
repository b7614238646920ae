"""``load_model()``: an H0-mini (or any checkpoint of the family) ready for inference."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import checkpoint_filter_fn

from .constants import CONFIG_WARNING_KEY, ENV_WEIGHTS, H0_MINI_ARCH, H0_MINI_REPO_ID, REPO_ARCHS, SWIGLU_MLP_RATIO
from .errors import IncompatibleCheckpointError, InvalidArgumentError, ModelNotFoundError
from .hub import Checkpoint, PathLike, resolve_checkpoint, split_revision
from .onnx_model import is_onnx_source, load_onnx_model
from .runtime import DTYPES, resolve_device

logger = logging.getLogger(__name__)

DTypeLike = Union[str, torch.dtype, None]
DeviceLike = Union[str, torch.device, None]



@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of loaded weights, attached to the model as ``model.h0mini_weights``."""

    source: str  # what the caller passed: a repo id or a path
    arch: str
    weights_path: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None  # commit hash for Hub weights
    warning: Optional[str] = None  # what the checkpoint says of itself (demo weights: random)
    _sha256: Dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        """sha256 of the weights file, computed on first use (a few seconds for H0-mini)."""
        if "value" not in self._sha256:
            self._sha256["value"] = file_sha256(self.weights_path)
        return self._sha256["value"]

    def as_dict(self) -> Dict[str, Optional[str]]:
        info = {
            "weights": self.source,
            "arch": self.arch,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "weights_file": self.weights_path.name,
            "weights_sha256": self.sha256,
        }
        if self.warning:
            info["warning"] = self.warning
        return info


def weights_fingerprint(model: Any, *, state: bool = False) -> str:
    """What names a model's numbers, for caches and resume keys: the sha256 of the weights file
    ``load_model`` read, else (a ``timm.create_model`` model) ``"state:"`` and a sha256 over its
    state: every tensor's name, dtype, shape and bytes, in order.

    The file's sha256 names the model as ``load_model`` returned it: one changed since (fine-tuned
    or cast in place, ``load_state_dict``) keeps it. ``state=True`` digests the state whatever the
    model's origin, for a model that may have changed since it was loaded."""
    info = getattr(model, "h0mini_weights", None)
    if isinstance(info, WeightsInfo) and not state:
        return info.sha256
    digest = hashlib.sha256()
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state:" + digest.hexdigest()


def file_sha256(path: PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_weights() -> str:
    """The weights ``load_model()`` uses when given none: ``$H0MINI_WEIGHTS`` or the Hub repo.

    A relative ``H0MINI_WEIGHTS`` path is resolved against the current folder, and used (and
    recorded) as the absolute path; when nothing is there, the error names that folder.
    """
    value = os.environ.get(ENV_WEIGHTS)
    if not value:
        return H0_MINI_REPO_ID
    path = Path(value).expanduser()
    if path.is_absolute() or split_revision(value)[0] is not None:  # an absolute path, or a Hub repo id
        return value
    resolved = Path.cwd() / path
    if not resolved.exists():
        raise ModelNotFoundError(
            f"{ENV_WEIGHTS}={value!r} is a relative path, and the current folder {str(Path.cwd())!r} has no "
            f"{value!r}. Set {ENV_WEIGHTS} to an absolute path (e.g. export {ENV_WEIGHTS}=\"$PWD/{value}\" "
            "in the folder that holds it), or pass the weights explicitly.",
            name=value,
        )
    return str(resolved.resolve())


def load_model(
    weights: Optional[PathLike] = None,
    *,
    arch: Optional[str] = None,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    device: DeviceLike = "auto",
    dtype: DTypeLike = None,
) -> torch.nn.Module:
    """Load H0-mini (or another checkpoint of the family) in eval mode.

    Args:
        weights: a Hub repo id (default ``"bioptimus/H0-mini"``, or ``$H0MINI_WEIGHTS`` when set),
            optionally with a revision (``"bioptimus/H0-mini@<commit>"``, timm's ``"hf-hub:..."`` too),
            a local folder in the Hub layout (``config.json`` + ``model.safetensors``), or a single
            weights file (``.safetensors``; ``.bin``/``.pth`` are read with ``weights_only=True``).
        arch: timm architecture to build, overriding ``config.json``. Defaults to the config's
            architecture, or ``"h0_mini"`` for a bare weights file.
        revision: branch, tag or commit of a Hub repo. Default: ``main``.
        token: Hugging Face token for the gated repo. Default: ``HF_TOKEN`` or the stored login.
            Never logged.
        cache_dir: Hub cache folder. Default: huggingface_hub's (``HF_HUB_CACHE``/``HF_HOME``).
        local_files_only: use only the cache, never the network. Default: ``HF_HUB_OFFLINE``.
        device: where to put the model: ``"auto"`` (default: CUDA when available, else the CPU),
            ``"cpu"``, ``"cuda:1"``... ``None`` leaves it on the CPU.
        dtype: parameter dtype (``torch.bfloat16``, ``"float16"``...). Default: float32.

    Returns:
        A ``timm`` ``VisionTransformer`` whose ``forward`` returns all tokens,
        shape ``(B, 1 + 4 + N_patches, dim)``: CLS, 4 registers, then the patch grid.
        ``model.h0mini_weights`` records where the weights came from.

    Raises:
        GatedModelError: the Hub refused access (no token, or access not approved).
        WeightsNotCachedError: offline (or no network) and the weights are not cached.
        ModelNotFoundError: unknown repo, revision, file or folder.
        IncompatibleCheckpointError: the checkpoint does not fit the architecture.

    Example:
        >>> model = h0mini.load_model()
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 261, 768])
    """
    source = str(weights) if weights is not None else default_weights()
    if is_onnx_source(source):
        return _load_export(source, arch=arch, device=device, dtype=dtype)
    checkpoint = resolve_checkpoint(
        source, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    arch_name, model_kwargs, pretrained_cfg = architecture_for(checkpoint, arch)
    try:
        model = timm.create_model(arch_name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ModelNotFoundError(
                f"Unknown architecture {arch_name!r} (from {'arch=' if arch else 'config.json of ' + source}). "
                "Use a timm model name or one of h0mini's: h0_mini, h_optimus_0, h_optimus_1.",
                name=arch_name,
            ) from error
        raise
    state_dict = read_state_dict(checkpoint.weights_path)
    load_state_dict_strict(model, state_dict, arch_name=arch_name, source=source)
    model.eval()
    device = resolve_device(device) if device is not None else None
    if device is not None or dtype is not None:
        model.to(device=device, dtype=resolve_dtype(dtype))
    model.h0mini_weights = WeightsInfo(  # type: ignore[attr-defined]
        source=source,
        arch=arch_name,
        weights_path=checkpoint.weights_path,
        repo_id=checkpoint.repo_id,
        revision=checkpoint.revision,
        warning=_checkpoint_warning(checkpoint),
    )
    _warn_if_labelled(model.h0mini_weights, stacklevel=3)  # type: ignore[attr-defined]
    log_preprocessing_changes(arch_name, getattr(model, "pretrained_cfg", None), source)
    logger.info("Loaded %s from %s (revision %s)", arch_name, source, checkpoint.revision or "local")
    return model


def _load_export(source: str, *, arch: Optional[str], device: DeviceLike, dtype: DTypeLike) -> torch.nn.Module:
    """An ``h0mini export`` folder: fixed architecture and precision, CPU only (ONNX Runtime's CPU provider)."""
    if arch is not None or resolve_dtype(dtype) not in (None, torch.float32):
        raise InvalidArgumentError(f"{source!r} is an ONNX export: its architecture and precision are fixed; "
                                   "drop arch= and dtype=", argument="arch" if arch is not None else "dtype",
                                   accepted="None for an ONNX export")
    if device is not None and str(device) != "auto" and torch.device(device).type != "cpu":
        raise InvalidArgumentError(f"{source!r} is an ONNX export and runs on the CPU (ONNX Runtime); use device='cpu'",
                                   argument="device", accepted="'auto' or 'cpu' for an ONNX export")
    model = load_onnx_model(source)
    origin = model.config.get("source", {})
    model.h0mini_weights = WeightsInfo(  # type: ignore[attr-defined]
        source=source,
        arch=f"{model.config['architecture']['arch']}-onnx-{model.precision}",
        weights_path=model.model_path,
        repo_id=origin.get("repo_id"),
        revision=origin.get("revision"),
        warning=str(origin["warning"]) if origin.get("warning") else None,  # exported from demo weights
    )
    _warn_if_labelled(model.h0mini_weights, stacklevel=4)  # type: ignore[attr-defined]
    logger.info("Loaded the ONNX export %s (%s, ONNX Runtime)", source, model.precision)
    return model


# What decides the pixels the model sees; a config.json that says otherwise than h0mini's built-in cfg is logged.
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_LOGGED_CHANGES: set = set()


def preprocessing_changes(arch: str, pretrained_cfg: Any) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (built-in, resolved)}`` for each preprocessing key where ``pretrained_cfg`` differs from the
    one h0mini registers for ``arch`` (empty for architectures h0mini does not register)."""
    from .registry import ARCH_ARGS

    if arch not in ARCH_ARGS or pretrained_cfg is None:
        return {}
    built_in = timm.models.get_pretrained_cfg(arch).to_dict()
    resolved = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg)
    changes = {}
    for key in PREPROCESSING_KEYS:
        a, b = built_in.get(key), resolved.get(key)
        if (tuple(a) if isinstance(a, (list, tuple)) else a) != (tuple(b) if isinstance(b, (list, tuple)) else b):
            changes[key] = (a, b)
    return changes


def log_preprocessing_changes(arch: str, pretrained_cfg: Any, source: str) -> None:
    """One warning per process and weights: the Hub's config.json rules (the model card's numbers), and it
    is said where that changes what h0mini's built-in config would do."""
    changes = preprocessing_changes(arch, pretrained_cfg)
    key = (source, arch, tuple(sorted((k, repr(v)) for k, v in changes.items())))
    if not changes or key in _LOGGED_CHANGES:
        return
    _LOGGED_CHANGES.add(key)
    shown = "; ".join(f"{k} {b!r} (built-in {a!r})" for k, (a, b) in changes.items())
    logger.warning("%s: the preprocessing of its config.json differs from h0mini's built-in %s config, and is "
                   "followed (as the model card's timm.create_model does): %s", source, arch, shown)


def _warn_if_labelled(weights: WeightsInfo, stacklevel: int) -> None:
    """Repeat what the weights say of themselves (demo weights: random), pointing at load_model's caller."""
    if weights.warning:
        warnings.warn(f"{weights.source}: {weights.warning}", UserWarning, stacklevel=stacklevel)


def _checkpoint_warning(checkpoint: Checkpoint) -> Optional[str]:
    text = (checkpoint.config or {}).get(CONFIG_WARNING_KEY)
    return str(text) if text else None


def resolve_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}",
                                   argument="dtype", accepted=", ".join(sorted(DTYPES)))
    return DTYPES[key]


def architecture_for(
    checkpoint: Checkpoint, arch: Optional[str] = None
) -> Tuple[str, Dict[str, Any], Optional[Dict[str, Any]]]:
    """Architecture name, model kwargs and pretrained cfg for a checkpoint, as timm's hf-hub loader reads them.

    A Hub ``config.json`` cannot store the SwiGLU layer classes. The Bioptimus repos
    are built with h0mini's registered architectures; any other config naming a base
    timm architecture with the Bioptimus MLP ratio gets ``SwiGLUPacked``/``SiLU``
    added: the same arguments the model card passes by hand.
    """
    config = checkpoint.config
    if config is None:
        return arch or H0_MINI_ARCH, {}, None
    config = dict(config)
    if "pretrained_cfg" in config:
        pretrained_cfg = dict(config["pretrained_cfg"])
    else:  # legacy single-dict layout
        pretrained_cfg = {k: v for k, v in config.items() if k not in ("architecture", "num_features", "model_args")}
    if "num_classes" in config:
        pretrained_cfg["num_classes"] = config["num_classes"]
    if checkpoint.repo_id:
        pretrained_cfg.update(hf_hub_id=checkpoint.repo_id, source="hf-hub")
    else:
        pretrained_cfg.update(file=str(checkpoint.weights_path), source="local-dir")
    model_kwargs = dict(config.get("model_args") or {})
    name = arch or REPO_ARCHS.get(checkpoint.repo_id or "") or config.get("architecture")
    if not name:
        raise ModelNotFoundError(
            f"config.json of {checkpoint.weights_path.parent} names no 'architecture'; pass arch='h0_mini' "
            "(or the timm model name) to load_model.",
            name=str(checkpoint.weights_path.parent),
        )
    if _needs_swiglu(name, model_kwargs):
        model_kwargs.setdefault("mlp_layer", SwiGLUPacked)
        model_kwargs.setdefault("act_layer", torch.nn.SiLU)
    model_kwargs.setdefault("num_classes", 0)
    model_kwargs.setdefault("dynamic_img_size", True)
    return name, model_kwargs, pretrained_cfg


def _needs_swiglu(name: str, model_kwargs: Mapping[str, Any]) -> bool:
    from .registry import ARCH_ARGS

    ratio = model_kwargs.get("mlp_ratio")
    return name not in ARCH_ARGS and ratio is not None and abs(float(ratio) - SWIGLU_MLP_RATIO) < 1e-3


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a weights file, on CPU; pickled formats only with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or truncated file, or a pickle with code in it
        raise IncompatibleCheckpointError(
            f"Could not read the weights file {str(path)!r}: {type(error).__name__}: {error}. "
            "If it was downloaded, delete it and download again."
        ) from error
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise IncompatibleCheckpointError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


def load_state_dict_strict(
    model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], *, arch_name: str, source: str
) -> None:
    """Load strictly; on mismatch, name the first offending keys and the likely cause."""
    state_dict = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state_dict.items()}
    # timm's own conversion: DINOv2-format keys (w12/w3, mask_token) become timm's.
    state_dict = checkpoint_filter_fn(state_dict, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise IncompatibleCheckpointError(_mismatch_message(source, arch_name, missing, unexpected, mismatched))
    model.load_state_dict(state_dict, strict=True)


def _mismatch_message(
    source: str, arch_name: str, missing: List[str], unexpected: List[str], mismatched: List[str]
) -> str:
    lines = [f"The checkpoint {source!r} does not fit the architecture {arch_name!r}."]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            lines.append(f"  {label}: {shown}")
    fc1 = [m for m in mismatched if ".mlp.fc" in m]
    if fc1 and len(fc1) == len(mismatched):
        lines.append(
            "Likely cause: the MLP layout differs. H0-mini and H-optimus use packed SwiGLU "
            "(mlp_layer=SwiGLUPacked, act_layer=SiLU, mlp_ratio=5.33334); build with arch='h0_mini' "
            "(or 'h_optimus_0') rather than a plain timm ViT."
        )
    elif mismatched or (missing and unexpected):
        lines.append(
            "Likely cause: these weights belong to another model. Pass arch= with the architecture they "
            "were trained with, or check the weights path."
        )
    return "\n".join(lines)
