"""How the model runs fastest on a device: device and precision choice, attention kernel, torch.compile.

Every choice here is measured (README, "Performance"; ``benchmarks/``). On CPUs with native
bf16, timm's explicit attention (``q @ k.T``, softmax, ``@ v``) beats PyTorch's fused CPU
attention kernel in bf16 by about 10% of the whole forward pass at batch 8, while the fused
kernel stays faster in fp32 and on GPUs. ``torch.compile`` on CPU freezes the weights, which
lets oneDNN pre-pack them (about 20% more on top); frozen weights are constants of the
compiled graph, so a change to the weights is detected and triggers a fresh compilation.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import types
import warnings
import weakref
from typing import Callable, Iterator, Optional, Tuple, Union

import torch

from .errors import InvalidArgumentError
from .wording import say

logger = logging.getLogger(__name__)

# The one table of dtype names (load_model's dtype= and the precision= of embedding).
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# As autocast dtypes: None is fp32, no autocast.
PRECISIONS = {name: (None if dtype is torch.float32 else dtype) for name, dtype in DTYPES.items()}
PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidArgumentError(
            f"{say('device', '--device')} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}",
            argument="device", accepted="'auto', 'cpu', 'cuda', 'cuda:N'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"{say('device', '--device')} {str(device)!r} was asked for but CUDA is not available; use "
            + say("device='cpu'", "--device cpu"), argument="device", accepted="'auto', 'cpu', 'cuda', 'cuda:N'")
    return device


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX): where bf16 autocast about triples CPU throughput."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means fp32 (no autocast)."""
    key = str(precision).lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if key not in PRECISIONS:
        raise InvalidArgumentError(f"{say('precision', '--precision')} must be 'auto', 'fp32', 'fp16' or 'bf16', "
                                   f"got {precision!r}", argument="precision", accepted="'auto', 'fp32', 'fp16', 'bf16'")
    dtype = PRECISIONS[key]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidArgumentError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use "
                                   + say("precision='fp16'", "--precision fp16"), argument="precision",
                                   accepted="'auto', 'fp32', 'fp16'")
    return dtype


def prefers_explicit_attention(device: torch.device, compute_dtype: Optional[torch.dtype]) -> bool:
    """Where timm's explicit attention beats the fused SDPA kernel (measured: bf16 on CPU only)."""
    return device.type == "cpu" and compute_dtype is torch.bfloat16


class ModelForward:
    """``model.forward_features`` in its fastest measured form for one device and compute dtype.

    Callable on a normalised ``(B, 3, H, W)`` batch; returns the token tensor. With
    ``compile=True`` a batch smaller than ``pad_to`` is padded so that the compiled graph
    (static shapes) is reused instead of recompiled for the last, shorter batch. Call
    ``start_run()`` before each pass over a dataset: frozen weights are checked then.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: Optional[torch.dtype],
                 compile: bool = False):
        self.model = model
        self.explicit_attention = prefers_explicit_attention(device, compute_dtype)
        self._attention = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
        self.compiled = _CompiledFeatures(model, freeze=device.type == "cpu") if compile else None

    def start_run(self) -> None:
        if self.compiled is not None:
            self.compiled.check_weights = True

    def __call__(self, x: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
        with self._eval_mode(), self._attention_kernel():
            if self.compiled is None:
                return features_fn(self.model)(x)
            count = x.shape[0]
            if pad_to is not None and count < pad_to:
                x = torch.cat([x, x.new_zeros((pad_to - count, *x.shape[1:]))])
            tokens = self.compiled(x)
            if self.compiled.failed:
                self.compiled = None
            return tokens[:count]

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout, running batch-norm statistics) for this call only.

        A model in training (a validation pass inside a fine-tuning loop) gets its training flags
        back afterwards, module by module. The lock keeps another thread's forward pass from
        running while the flags are switched.
        """
        if not any(m.training for m in self.model.modules()):
            yield
            return
        with _ATTENTION_SWITCH:
            training = [m for m in self.model.modules() if m.training]
            for module in training:
                module.training = False
            try:
                yield
            finally:
                for module in training:
                    module.training = True

    @contextlib.contextmanager
    def _attention_kernel(self) -> Iterator[None]:
        """Switch timm attention blocks to the explicit path for this call only: the model stays the user's.

        The lock keeps two threads embedding with one model from restoring each other's switch
        in the wrong order (which would leave the model switched); on a CPU they gain nothing
        from running their forward passes at the same time anyway.
        """
        if not self.explicit_attention or not self._attention:
            yield
            return
        with _ATTENTION_SWITCH:
            saved = [m.fused_attn for m in self._attention]
            for module in self._attention:
                module.fused_attn = False
            try:
                yield
            finally:
                for module, fused in zip(self._attention, saved):
                    module.fused_attn = fused


_ATTENTION_SWITCH = threading.RLock()


def features_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return model.forward_features if hasattr(model, "forward_features") else model


_WeightsState = Tuple[Tuple[int, float], ...]


@torch.no_grad()
def _weights_state(model: torch.nn.Module) -> _WeightsState:
    """Storage and value sum of every parameter and buffer: changes whenever a weight does.

    Values, not version counters: ``p.data.mul_()`` (EMA updates, hand-made fine-tuning) and
    inference-mode tensors leave the counter alone. One pass over the weights (tens of ms for
    H0-mini), so it runs once per pass over a dataset, not per batch.
    """
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), float(t.sum(dtype=torch.float64)) if t.is_floating_point() else float(t.sum()))
                 for t in tensors)


class _CompiledFeatures:
    """``torch.compile`` of the features function; on CPU with frozen weights, refreshed when they change.

    Dynamo caches compiled graphs per code object. Each model gets an entry function with a code
    object of its own (``_private_entry``), so embedders of one model share one compilation and
    nothing else in the process shares it. With frozen weights that cache would silently keep
    old weights after an update between two runs (fine-tuning, EMA): the weights' state is
    remembered per model and a change gives the model a fresh code object, so only h0mini's
    graph of that model is compiled again (never ``torch._dynamo.reset()``, which would also
    drop the caller's own compiled functions).
    A compiler failure (no C++ compiler) is a warning and the forward pass falls back to eager
    mode: a speed option never stops a job.
    """

    def __init__(self, model: torch.nn.Module, freeze: bool):
        self.model = model
        self.freeze = freeze
        self.failed = False
        self.check_weights = True
        self._fn = torch.compile(_private_entry(model), dynamic=False, backend=COMPILE_BACKEND)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return features_fn(self.model)(x)
        if self.freeze and self.check_weights:
            self.check_weights = False
            state = _weights_state(self.model)
            frozen = _FROZEN_WEIGHTS.get(self.model)
            if frozen is not None and frozen != state:
                logger.info("model weights changed since torch.compile froze them: compiling again")
                self._fn = torch.compile(_private_entry(self.model, fresh=True), dynamic=False,
                                         backend=COMPILE_BACKEND)
            _FROZEN_WEIGHTS[self.model] = state
        try:
            with self._freezing():
                return self._fn(x)
        except Exception as error:  # noqa: BLE001 - a compiler failure: fall back, say why
            if not _is_compiler_error(error):
                raise
            self.failed = True
            warnings.warn(
                f"torch.compile failed on this machine ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "continuing without compile. On CPU, torch.compile needs a C++ compiler (gcc or clang).",
                RuntimeWarning,
                stacklevel=4,
            )
            return features_fn(self.model)(x)

    def _freezing(self) -> contextlib.AbstractContextManager:
        if not self.freeze:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        # Set around every call, not through torch.compile(options=...), which does not
        # reach inductor's freezing pass in torch 2.14 (measured: no speed-up that way).
        return inductor_config.patch(freezing=True)


COMPILE_BACKEND = "inductor"  # tests swap in "eager" to check the caching without a C++ build


def _entry_template(features: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def entry(x: torch.Tensor) -> torch.Tensor:
        return features(x)

    return entry


_ENTRY_CODES: "weakref.WeakKeyDictionary[torch.nn.Module, types.CodeType]" = weakref.WeakKeyDictionary()
_ENTRY_NUMBERS = itertools.count()


def _private_entry(model: torch.nn.Module, fresh: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``features_fn(model)`` behind a function whose code object belongs to ``model`` (a new one when
    ``fresh``): dynamo's cache of compiled graphs hangs on that code object, and on nothing shared."""
    template = _entry_template(features_fn(model))
    code = None if fresh else _ENTRY_CODES.get(model)
    if code is None:
        code = template.__code__.replace(co_name=f"h0mini_features_{next(_ENTRY_NUMBERS)}")
        _ENTRY_CODES[model] = code
    return types.FunctionType(code, template.__globals__, code.co_name, None, template.__closure__)


# The weights each model had when torch.compile last froze them (values hold no reference to the model).
_FROZEN_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, _WeightsState]" = weakref.WeakKeyDictionary()


def _is_compiler_error(error: Exception) -> bool:
    """The backend failed (inductor, its C++ toolchain), not the model: errors of the model's own
    code while tracing (a wrong input shape) come as dynamo's TorchRuntimeError and are re-raised."""
    import torch._dynamo.exc as dynamo_errors

    return isinstance(error, dynamo_errors.BackendCompilerFailed) or type(error).__module__.startswith("torch._inductor")
