"""``embed_tiles()``: tiles in, embeddings out, in input order, with the model busy.

Decoding (and resizing, when a tile is not the model's size) happens in
DataLoader worker processes or a background thread, producing uint8 batches;
batch k+1 is prepared while the model runs batch k. On CUDA the uint8 batch is
pinned and copied non-blocking (4x less traffic than float32), then converted
and normalised on the GPU, and the forward pass runs under ``inference_mode``
with fp16 autocast (the model card's choice). On CPU the default is bf16
autocast where the processor has native bf16 (AVX512-BF16 or AMX), fp32
elsewhere. How the forward pass itself runs (attention kernel, torch.compile)
is ``h0mini.runtime``'s business.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import queue
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import InvalidArgumentError, InvalidTileError, SlideError, shown
from .interrupt import started_as_command
from .jpeg import ENCODED, JPEG_DECODERS, decode_on_device, read_encoded
from .model import default_weights, load_model
from .onnx_model import OnnxModel, is_onnx_source
from .preprocess import Preprocessing
from .runtime import PRECISION_NAMES, ModelForward, resolve_device, resolve_precision
from .tiles import TileRef, DatasetItems, describe, read_input
from .deprecation import take_options
from .wording import say

logger = logging.getLogger(__name__)

OUTPUTS = ("cls+mean", "cls", "mean", "patch_tokens", "all")
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 8}  # tiles per forward pass (measured fastest on each)
ModelLike = Union[torch.nn.Module, str, os.PathLike, None]


class SkippedTilesWarning(UserWarning):
    """Some tiles could not be read and were left out (``on_error="skip"``); ``.skipped`` lists them."""

    def __init__(self, skipped: List["SkippedTile"]):
        shown = "; ".join(str(s) for s in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        super().__init__(f"{len(skipped)} tile(s) skipped: {shown}{more}")
        self.skipped = skipped


@dataclass(frozen=True)
class SkippedTile:
    index: int
    source: str
    reason: str

    def __str__(self) -> str:
        return f"tile {self.index} ({shown(self.source)}): {self.reason}"


@dataclass
class EmbeddedBatch:
    """One batch of results: ``indices`` are positions in the input, ``features`` maps output name to rows."""

    indices: np.ndarray
    features: Dict[str, torch.Tensor]
    skipped: List[SkippedTile] = field(default_factory=list)


def embed_tiles(
    tiles: Any,
    model: ModelLike = None,
    *,
    embedding: str = "cls+mean",
    batch_size: Optional[int] = None,
    device: Union[str, torch.device] = "auto",
    precision: str = "auto",
    num_workers: Union[int, str] = "auto",
    input_size: Union[int, str, None] = None,
    compile: bool = False,
    jpeg_decode: str = "cpu",
    on_error: str = "raise",
    progress: Optional[bool] = None,
    return_tensors: bool = False,
    return_dtype: Union[str, np.dtype, torch.dtype] = "float32",
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    **options: Any,
) -> Any:
    """Embed pathology tiles with H0-mini (or any model of the family).

    Args:
        tiles: a PIL image; a uint8 array (H, W, 3) or stack (N, H, W, 3); a tensor (3, H, W) or
            (N, 3, H, W), uint8 or float in [0, 1]; a path to an image file; a folder (its image files,
            sorted); a glob; a .txt/.csv list of paths; a torch Dataset; or any iterable of these
            (streamed).
        model: a model from ``load_model()``, or weights to load (repo id, ``repo@revision``, folder,
            file). Default: H0-mini, loaded once per process.
        embedding: ``"cls+mean"`` (CLS and the mean of the patch tokens concatenated, the model card's
            embedding, 1536-d), ``"cls"`` (768-d), ``"mean"`` (768-d), ``"patch_tokens"`` (N, 256, 768)
            or ``"all"`` (a dict with ``cls``, ``registers`` and ``patch_tokens``). Register tokens never
            enter the mean.
        batch_size: tiles per forward pass. Default: 256 on CUDA, 8 on CPU (measured fastest there).
            On CUDA out-of-memory the batch is split and the smaller size kept.
        device: ``"auto"``: a model you pass runs where it is; weights to load go to CUDA when
            available, else the CPU. ``"cpu"``, ``"cuda:1"``...: the model is moved there.
        precision: ``"auto"`` (fp16 on CUDA; bf16 on CPUs with native bf16, else fp32), ``"fp32"``,
            ``"fp16"`` or ``"bf16"``: autocast dtype of the forward pass.
        num_workers: DataLoader worker processes decoding files. ``"auto"``: up to 8 on CUDA (none for
            small inputs); none on CPU, where a background thread decodes (measured faster there).
        progress: progress bar with tiles/s; default shown on a terminal or notebook.
        on_error: ``"raise"`` (an ``InvalidTileError`` naming the tile; embeddings already computed are on
            its ``partial`` attribute) or ``"skip"`` (bad tiles are left out of the result and listed in a
            ``SkippedTilesWarning``).
        input_size: None (the model's, 224: other sizes are resized and centre-cropped as the model card
            does), an int multiple of 14, or ``"native"`` to keep each tile's size (multiples of 14).
        return_tensors: return torch tensors (on CPU) instead of numpy arrays.
        return_dtype: dtype of the returned values. Default float32.
        compile: run the model through ``torch.compile``: the first batch waits for compilation
            (15-30 s on CPU), later ones run about 20% faster in bf16 on CPU (frozen weights,
            recompiled if they change). Worth it from a few thousand tiles; falls back to eager
            mode with a warning where compilation fails.
        jpeg_decode: ``"cpu"`` (Pillow, in the workers) or ``"device"``: JPEG files at the model's
            input size are decoded on the model's device, nvJPEG on CUDA, by torchcodec
            (``h0mini[jpeg]``) or torchvision (workers only read bytes). Other files, and JPEGs
            the device decoder rejects or that carry an EXIF rotation, use Pillow.
        revision, token, cache_dir: passed to ``load_model`` when ``model`` is weights to load.
        **options: only the names of the previous release (``output=``, ``dtype=``), with a
            ``DeprecationWarning``; any other name is an ``UnknownOptionError`` listing the valid ones.

    Returns:
        ``(N, D)`` array (``(N, 256, D)`` for ``"patch_tokens"``, a dict for ``"all"``), rows in input
        order. One tile in (an image, a single array or tensor, one file) gives a 1-D vector.

    Raises:
        InvalidTileError: a tile is missing, corrupt, not an image, or of the wrong shape, dtype or range.
        UnknownOptionError: an option this function does not take.

    Example:
        >>> feats = h0mini.embed_tiles("tiles/")
        >>> feats.shape
        (7, 1536)
    """
    renamed = take_options("embed_tiles", embed_tiles, options,
                           {"embedding": embedding, "return_dtype": return_dtype})
    embedding, return_dtype = renamed["embedding"], renamed["return_dtype"]
    if on_error not in ("raise", "skip"):
        raise InvalidArgumentError(f"on_error must be 'raise' or 'skip', got {on_error!r}", argument="on_error",
                                   accepted="'raise', 'skip'")
    check_return_dtype(return_dtype, return_tensors)
    embedder = TileEmbedder(
        model,
        embedding=embedding,
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
        input_size=input_size,
        compile=compile,
        jpeg_decode=jpeg_decode,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
    )
    source = read_input(tiles)
    result, skipped = collect(embedder, source, on_error=on_error, progress=progress, dtype=return_dtype,
                              return_tensors=return_tensors)
    if skipped:
        warnings.warn(SkippedTilesWarning(skipped), stacklevel=2)
    return result


def collect(
    embedder: "TileEmbedder",
    source: Any,
    *,
    on_error: str = "raise",
    progress: Optional[bool] = None,
    dtype: Union[str, np.dtype, torch.dtype] = "float32",
    return_tensors: bool = False,
) -> Tuple[Any, List[SkippedTile]]:
    """Run ``embedder`` over ``source`` (from ``read_input``): the rows in input order, and the skipped tiles."""
    parts: List[EmbeddedBatch] = []
    skipped: List[SkippedTile] = []
    output = embedder.output
    try:
        with make_progress(progress, total=source.length) as bar:
            for batch in embedder.iter_batches(source, on_error=on_error):
                parts.append(batch)
                skipped.extend(batch.skipped)
                bar.update(len(batch.indices) + len(batch.skipped))
    except InvalidTileError as error:
        if parts:
            error.partial = _convert(_assemble(parts, output), dtype, return_tensors)  # type: ignore[attr-defined]
        raise
    if source.single and skipped:  # one tile in and it was bad: there is nothing to return
        raise InvalidTileError(skipped[0].reason, index=0, source=skipped[0].source)
    result = _convert(_assemble(parts, output, empty_dim=embedder.output_shape()), dtype, return_tensors)
    if source.single:
        result = {k: v[0] for k, v in result.items()} if isinstance(result, dict) else result[0]
    return result, skipped


class TileEmbedder:
    """The reusable pipeline behind ``embed_tiles``: resolved model, device, precision and preprocessing.

    Takes the options of ``embed_tiles`` that decide how tiles become embeddings (the same names
    and defaults); ``iter_batches`` runs it over a source.
    """

    def __init__(
        self,
        model: ModelLike = None,
        *,
        embedding: str = "cls+mean",
        batch_size: Optional[int] = None,
        device: Union[str, torch.device] = "auto",
        precision: str = "auto",
        num_workers: Union[int, str] = "auto",
        input_size: Union[int, str, None] = None,
        compile: bool = False,
        jpeg_decode: str = "cpu",
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        **options: Any,
    ):
        embedding = take_options("TileEmbedder", TileEmbedder.__init__, options, {"embedding": embedding})["embedding"]
        if embedding not in OUTPUTS:
            raise InvalidArgumentError(f"{say('embedding', '--embedding')} must be one of {OUTPUTS}, got {embedding!r}")
        if jpeg_decode not in JPEG_DECODERS:
            raise InvalidArgumentError(f"jpeg_decode must be one of {JPEG_DECODERS}, got {jpeg_decode!r}")
        self.jpeg_decode = jpeg_decode
        model = resolve_model(model, revision=revision, token=token, cache_dir=cache_dir, device=device)
        if isinstance(model, OnnxModel):
            device, precision = _onnx_settings(model, device, precision, compile)
        elif str(device) == "auto":  # a model object runs where it is (loaded ones went to CUDA when available)
            device = _device_of(model, default="auto")
        self.device = resolve_device(device)
        # Never .eval() here: the model may be the caller's, in training; each forward pass runs in
        # eval mode and puts the training flags back (runtime.ModelForward).
        self.model = model.to(self.device)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        self.embedding = embedding
        self.autocast_dtype = resolve_precision(precision, self.device)
        _log_precision(self.device, precision, self.autocast_dtype)
        self.batch_size = _positive(batch_size, "batch_size") or DEFAULT_BATCH_SIZE["cuda" if self.device.type == "cuda" else "cpu"]
        self._micro_batch = self.batch_size
        self.num_workers = num_workers
        self.preprocessing = Preprocessing.from_model(self.model, input_size)
        parameter = next(self.model.parameters(), None)
        # A model loaded in bf16/fp16 takes inputs of its own dtype when no autocast converts them.
        self.weights_dtype = parameter.dtype if parameter is not None else torch.float32
        self._forward = ModelForward(self.model, self.device, self.autocast_dtype or self.weights_dtype, compile)

    @property
    def output(self) -> str:
        """The embedding kind (``embedding``), under its previous name."""
        return self.embedding

    @property
    def precision(self) -> str:
        if isinstance(self.model, OnnxModel):
            return f"onnxruntime-{self.model.precision}"
        return PRECISION_NAMES[self.autocast_dtype]

    def output_shape(self) -> Dict[str, Tuple[int, ...]]:
        """Per-tile shapes of each output array (patch count for the model's own input size)."""
        dim = int(getattr(self.model, "num_features", getattr(self.model, "embed_dim", 0)))
        size = self.preprocessing.size or 224
        patches = (size // self.preprocessing.patch_size) ** 2
        registers = self.num_prefix_tokens - 1
        return {
            "cls+mean": (2 * dim,), "cls": (dim,), "mean": (dim,), "patch_tokens": (patches, dim),
            "registers": (registers, dim),
        }

    def iter_batches(self, source: Any, *, on_error: str = "raise") -> Iterator[EmbeddedBatch]:
        """Embed batch by batch; with ``on_error="raise"`` the first bad tile stops the run."""
        source = source if hasattr(source, "all_paths") else read_input(source)
        self._forward.start_run()
        batches = self._prepared_batches(source)
        with contextlib.closing(batches):  # stops the prefetch thread or DataLoader workers on early exit
            yield from self._embed_batches(batches, on_error)

    def _embed_batches(self, batches: Iterator[tuple], on_error: str) -> Iterator[EmbeddedBatch]:
        warned_oversize = False
        for number, (indices, pixel_groups, skipped, notes) in enumerate(batches, start=1):
            if notes and not warned_oversize:  # once per run: the first such tile stands for all
                warned_oversize = True
                warnings.warn(f"tile {notes[0][0]} ({shown(notes[0][1])}): {notes[0][2]} (shown once per run)",
                              UserWarning, stacklevel=4)
            if number % TRIM_EVERY == 0 and started_as_command():  # the command owns its process; a library does not
                release_freed_memory()
            if any(isinstance(pixels, list) for _, pixels in pixel_groups):
                pixel_groups, skipped = self._decode_jpegs(pixel_groups, skipped)
            if skipped and on_error == "raise":
                bad = skipped[0]
                raise InvalidTileError(f"{bad.reason}; {_skip_hint()}", index=bad.index, source=bad.source)
            features: Dict[str, List[torch.Tensor]] = {}
            order: List[np.ndarray] = []
            for group_indices, pixels in pixel_groups:
                for name, value in self._embed_pixels(pixels).items():
                    features.setdefault(name, []).append(value)
                order.append(group_indices)
            if order:
                merged = {name: torch.cat(values) for name, values in features.items()}
                yield EmbeddedBatch(np.concatenate(order), merged, skipped)
            elif skipped:
                yield EmbeddedBatch(np.zeros(0, dtype=np.int64), {}, skipped)

    def _decode_jpegs(self, pixel_groups: list, skipped: List[SkippedTile]) -> Tuple[list, List[SkippedTile]]:
        """Decode the batch's encoded JPEGs on the device; files the decoder rejects go through Pillow."""
        decoded_groups, rejected = [], []
        for group_indices, pixels in pixel_groups:
            if not isinstance(pixels, list):
                decoded_groups.append((group_indices, pixels))
                continue
            kept, tensors = [], []
            for index, item, tensor in zip(group_indices, pixels, decode_on_device(pixels, self.device)):
                if tensor is None:  # the CPU path decodes it, or names why it cannot
                    _, array, reason, source, _ = _Prepare(self.preprocessing)(int(index), item.path)
                    if reason is not None:
                        rejected.append(SkippedTile(int(index), source, reason))
                        continue
                    tensor = torch.from_numpy(array).permute(2, 0, 1).to(self.device)
                kept.append(index)
                tensors.append(tensor)
            if tensors:
                decoded_groups.append((np.array(kept, dtype=np.int64), torch.stack(tensors)))
        if rejected:  # in input order, so that on_error="raise" names the first bad tile
            skipped = sorted([*skipped, *rejected], key=lambda s: s.index)
        return decoded_groups, skipped

    # -- preparation -----------------------------------------------------------------------

    def _prepared_batches(self, source: Any) -> Iterator[Tuple[np.ndarray, list, List[SkippedTile], list]]:
        workers = self._workers(source)
        prepare = _Prepare(self.preprocessing, encoded_jpegs=self.jpeg_decode == "device")
        if workers > 0 and (source.length is not None or source.all_paths):
            # A stream of unknown length (e.g. the tiles of slide after slide) is fed to the same
            # workers as it is consumed: the sampler hands each worker (index, item) keys, so the
            # pool lives as long as the stream, not one slide.
            sized = source.length is not None
            loader = torch.utils.data.DataLoader(
                _PreparedDataset(source.items, prepare) if sized else _KeyedDataset(prepare),
                batch_size=self.batch_size,
                sampler=None if sized else _Keys(source.items),
                num_workers=workers,
                collate_fn=collate,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2,
                persistent_workers=False,
                worker_init_fn=_single_threaded_worker,
            )
            yield from loader
        else:
            pin = self.device.type == "cuda"
            yield from prefetch(_batched_in_thread(source.items, prepare, self.batch_size, pin), depth=2)

    def _workers(self, source: Any) -> int:
        if source.in_process_only:
            return 0  # e.g. a slide opened by the caller: its handle must not travel to (or fork into) a worker
        if self.num_workers != "auto":
            return max(0, int(self.num_workers))
        if not source.all_paths and not isinstance(source.items, DatasetItems):
            return 0  # in-memory tiles: a thread prepares them without copying them to another process
        if source.length is not None and source.length < 4 * self.batch_size:
            return 0  # starting processes costs more than decoding a few tiles in a thread
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # On a CPU the model already uses every core: a worker process only oversubscribes them (2 cores:
        # 5-7x slower with one worker than with the decoding thread, benchmarks/cohort.py).
        return min(8, max(1, cpus - 1)) if self.device.type == "cuda" else 0

    # -- forward ---------------------------------------------------------------------------

    def _embed_pixels(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        pixels = pixels.to(self.device, non_blocking=True)
        while True:
            try:
                chunks = [self._forward_pool(part) for part in pixels.split(self._micro_batch)]
                break
            except torch.cuda.OutOfMemoryError:
                if self._micro_batch == 1:
                    raise
                self._micro_batch = max(1, self._micro_batch // 2)
                torch.cuda.empty_cache()
                logger.warning("CUDA out of memory: continuing with batches of %d tiles", self._micro_batch)
        return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}

    def _forward_pool(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = self.preprocessing.normalize(pixels)
            if self.autocast_dtype is None:
                x = x.to(self.weights_dtype)
            tokens = self._forward(x, pad_to=self._micro_batch)
            if tokens.ndim != 3:
                raise InvalidArgumentError(
                    f"the model returned shape {tuple(tokens.shape)}; embed_tiles needs its tokens (B, T, D): "
                    "use a timm ViT (forward_features) or a model with global_pool=''",
                    argument="model", accepted="a model whose forward_features returns tokens (B, T, D)")
            pooled = pool_tokens(tokens.float(), self.num_prefix_tokens, self.output)
        # A copy, never a view: a view of the CLS row would keep the whole token tensor alive.
        return {name: value.to("cpu", copy=True) for name, value in pooled.items()}


TRIM_EVERY = 32  # batches


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Streaming interleaves short-lived batch buffers with long-lived result rows, and
    glibc keeps the freed gaps: without this, resident memory grew by about 1.5 GiB
    over 100,000 streamed tiles although nothing leaked (see benchmarks/memory.py).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, output: str) -> Dict[str, torch.Tensor]:
    """Embeddings from ViT tokens (B, T, D): CLS first, then registers, then patches (never in the mean)."""
    cls = tokens[:, 0]
    patches = tokens[:, num_prefix_tokens:]
    if output == "cls":
        return {"cls": cls}
    if output == "mean":
        return {"mean": patches.mean(1)}
    if output == "cls+mean":
        return {"cls+mean": torch.cat([cls, patches.mean(1)], dim=-1)}
    if output == "patch_tokens":
        return {"patch_tokens": patches}
    return {"cls": cls, "registers": tokens[:, 1:num_prefix_tokens], "patch_tokens": patches}


# -- model, device and precision resolution --------------------------------------------------------


class _ModelCache:
    """The model ``embed_tiles`` loaded last, so that repeated calls do not reload it.

    One model at most (a second set of weights replaces the first), never shared between
    devices (it is loaded on the device it runs on: an embedder on another device gets its own),
    and keyed by everything that decides the weights: what ``$H0MINI_WEIGHTS`` says now, the
    revision, the token, the cache folder, and for a local path the file's size and time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Optional[tuple] = None
        self._model: Optional[torch.nn.Module] = None

    def get(self, weights: Optional[str], *, revision: Optional[str], token: Union[str, bool, None],
            cache_dir: Optional[str], device: Union[str, torch.device]) -> torch.nn.Module:
        source = weights if weights is not None else default_weights()
        onnx = is_onnx_source(source)
        target = "cpu" if onnx else str(resolve_device(device))
        key = (source, _file_stamp(source), revision, _token_key(token), cache_dir, target)
        with self._lock:
            if self._key != key or self._model is None:
                self._key = self._model = None  # the previous model is freed before the next loads
                self._model = load_model(weights, revision=revision, token=token, cache_dir=cache_dir,
                                         device="auto" if onnx else target)
                self._key = key
            return self._model

    def clear(self) -> None:
        with self._lock:
            self._key = self._model = None


_cached_model = _ModelCache()


def _file_stamp(source: str) -> Optional[Tuple[int, int]]:
    """Size and modification time of a local weights path (a rewritten file is loaded again)."""
    try:
        info = os.stat(source)
    except (OSError, ValueError):
        return None  # a Hub repo id
    return info.st_size, info.st_mtime_ns


def _token_key(token: Union[str, bool, None]) -> Any:
    """Tokens enter the key as a digest: the cache keeps no secret in memory."""
    if isinstance(token, str):
        import hashlib

        return hashlib.sha256(token.encode()).hexdigest()
    return token


def resolve_model(model: ModelLike, *, revision: Optional[str] = None, token: Union[str, bool, None] = None,
                  cache_dir: Union[str, os.PathLike, None] = None,
                  device: Union[str, torch.device] = "auto") -> torch.nn.Module:
    if model is None or isinstance(model, (str, os.PathLike)):
        weights = None if model is None else os.fspath(model)
        return _cached_model.get(weights, revision=revision, token=token,
                                 cache_dir=None if cache_dir is None else os.fspath(cache_dir), device=device)
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(
            f"model must be an nn.Module, a repo id or a path, got {type(model).__name__}",
            argument="model", accepted="a model from load_model(), a Hub repo id, or a path to weights")
    given = [name for name, value in (("revision", revision), ("token", token), ("cache_dir", cache_dir))
             if value is not None]
    if given:
        raise InvalidArgumentError(
            f"{', '.join(n + '=' for n in given)} apply to loading weights, but model is an already loaded "
            f"{type(model).__name__}; pass them to load_model(), or pass the repo id as model="
        )
    return model


def _device_of(model: torch.nn.Module, default: str) -> Union[str, torch.device]:
    """The device of ``model``'s parameters (``default`` for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else default


def _onnx_settings(model: OnnxModel, device: Union[str, torch.device], precision: str, compile: bool) -> Tuple[str, str]:
    """An ONNX export runs on the CPU in the precision it was exported with: other requests are errors."""
    if str(device) not in ("auto", "cpu"):
        raise InvalidArgumentError(
            f"{model.model_path} is an ONNX export and runs on the CPU (ONNX Runtime); use device='cpu'",
            argument="device", accepted="'auto' or 'cpu' for an ONNX export")
    if str(precision).lower() not in ("auto", "fp32", "float32"):
        raise InvalidArgumentError(
            f"{model.model_path} is an ONNX export ({model.precision}): its precision is fixed; use precision='auto'",
            argument="precision", accepted="'auto' for an ONNX export")
    if compile:
        raise InvalidArgumentError(f"compile=True applies to torch models; {model.model_path} is an ONNX export",
                                   argument="compile", accepted="False for an ONNX export")
    return "cpu", "fp32"


_LOGGED_PRECISIONS: set = set()


def _log_precision(device: torch.device, asked: str, dtype: Optional[torch.dtype]) -> None:
    """Say once per process and setting which precision runs (the CPU default depends on the hardware)."""
    name = PRECISION_NAMES[dtype]
    key = (device.type, str(asked), name)
    if key in _LOGGED_PRECISIONS:
        return
    _LOGGED_PRECISIONS.add(key)
    if str(asked).lower() == "auto" and device.type == "cpu":
        why = "this CPU has native bf16" if dtype is torch.bfloat16 else "this CPU has no native bf16"
        logger.info("embedding on the CPU in %s (precision='auto': %s)", name, why)
    else:
        logger.info("embedding on %s in %s (precision=%r)", device, name, asked)


def _skip_hint() -> str:
    return say('on_error="skip" leaves unreadable tiles out and lists them',
               "with `h0mini embed`, --on-error skip leaves unreadable tiles out and lists them")


def _positive(value: Optional[int], name: str) -> Optional[int]:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return value


# -- batching ------------------------------------------------------------------------------------


class _Prepare:
    """Picklable: decode one item in a worker, turning failures into a reason string."""

    def __init__(self, preprocessing: Preprocessing, encoded_jpegs: bool = False):
        self.preprocessing = preprocessing
        self.encoded_jpegs = encoded_jpegs

    def __call__(self, index: int, item: Any) -> Tuple[int, Any, Optional[str], str, Optional[str]]:
        """(index, pixels, why it failed, source, a note on how it was resized) for one tile."""
        if isinstance(item, TileRef):
            source = item.path
        else:
            source = os.fspath(item) if isinstance(item, (str, os.PathLike)) else describe(item)
        if self.encoded_jpegs and isinstance(item, (TileRef, str, os.PathLike)):
            encoded = read_encoded(source, self.preprocessing)
            if encoded is not None:
                return index, encoded, None, source, None
        elif self.encoded_jpegs and hasattr(item, "encoded_for_device"):  # a slide region's stored JPEG tiles
            encoded = item.encoded_for_device(self.preprocessing)
            if encoded is not None:
                return index, encoded, None, source, None
        try:
            pixels, note = self.preprocessing.prepare_noting(item)
            return index, pixels, None, source, note
        except (InvalidTileError, SlideError) as error:
            return index, None, error.reason, source, None
        except OSError as error:  # Pillow's decoding errors (a lazily loaded image of the caller's)
            return index, None, f"{type(error).__name__}: {error}", source, None
        # Anything else is a bug, here or in a caller's Dataset: it must stop the run, not skip every tile.


class _PreparedDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Any], prepare: _Prepare):
        self.items = items
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[int, Any, Optional[str], str, Optional[str]]:
        return self.prepare(index, self.items[index])


class _Keys:
    """A sampler over a stream: each key is ``(index, item)``, drawn only as workers need more."""

    def __init__(self, items: Iterable[Any]):
        self.items = items

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        return enumerate(self.items)


class _KeyedDataset(torch.utils.data.Dataset):
    """Prepares the ``(index, item)`` keys of a streamed input (see ``_Keys``)."""

    def __init__(self, prepare: _Prepare):
        self.prepare = prepare

    def __getitem__(self, key: Tuple[int, Any]) -> Tuple[int, Any, Optional[str], str, Optional[str]]:
        return self.prepare(*key)


def _single_threaded_worker(worker_id: int) -> None:
    """Workers decode one tile at a time: torch's own thread pool there only competes with the model
    for cores (on 2 cores the default oversubscription ran 2-6x slower than no workers at all)."""
    torch.set_num_threads(1)


def collate(samples: List[Tuple[int, Any, Optional[str], str, Optional[str]]]) -> Tuple[np.ndarray, list, List[SkippedTile], list]:
    """Stack prepared tiles into batches of equal shape and dtype, keeping their input indices.

    Returns indices, batches, skipped tiles and the resize notes ``(index, source, note)``.
    """
    skipped = [SkippedTile(i, source, reason) for i, pixels, reason, source, _ in samples if reason is not None]
    notes = [(i, source, note) for i, _, _, source, note in samples if note is not None]
    groups: Dict[Tuple, List[Tuple[int, torch.Tensor]]] = {}
    encoded = [(index, pixels) for index, pixels, *_ in samples if isinstance(pixels, ENCODED)]
    for index, pixels, reason, *_ in samples:
        if reason is not None or isinstance(pixels, ENCODED):
            continue
        tensor = torch.from_numpy(pixels).permute(2, 0, 1) if isinstance(pixels, np.ndarray) else pixels
        groups.setdefault((tensor.dtype, tuple(tensor.shape)), []).append((index, tensor))
    if len(groups) > 1 and any(k[0] == torch.uint8 for k in groups) and len({k[1] for k in groups}) == 1:
        # uint8 and float tiles of the same size: one float batch rather than two forward passes.
        members = sorted((m for g in groups.values() for m in g), key=lambda m: m[0])
        groups = {("float",): [(i, t.float().div(255) if t.dtype == torch.uint8 else t) for i, t in members]}
    batches = [
        (np.array([i for i, _ in members], dtype=np.int64), torch.stack([t for _, t in members]))
        for members in groups.values()
    ]
    if encoded:  # decoded next to the model: a list, not a stacked tensor
        batches.append((np.array([i for i, _ in encoded], dtype=np.int64), [e for _, e in encoded]))
    indices = np.concatenate([b[0] for b in batches]) if batches else np.zeros(0, dtype=np.int64)
    return indices, batches, skipped, notes


def _batched_in_thread(items: Iterable[Any], prepare: _Prepare, batch_size: int, pin: bool) -> Iterator[tuple]:
    """Prepare and collate batches; pinned for a non-blocking copy when the model is on CUDA."""
    samples = []
    try:
        for index, item in enumerate(items):
            samples.append(prepare(index, item))
            if len(samples) == batch_size:
                yield _pinned(collate(samples)) if pin else collate(samples)
                samples = []
        if samples:
            yield _pinned(collate(samples)) if pin else collate(samples)
    finally:  # stopped early: a generator source runs its own clean-up now, not whenever it is collected
        if inspect.isgenerator(items):
            items.close()


def _pinned(batch: Tuple[np.ndarray, list, List[SkippedTile], list]) -> Tuple[np.ndarray, list, List[SkippedTile], list]:
    indices, groups, skipped, notes = batch
    return indices, [(i, pixels if isinstance(pixels, list) else pixels.pin_memory()) for i, pixels in groups], skipped, notes


_DONE = object()


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (decoding overlaps the forward).

    When the consumer stops early (an error, Ctrl-C, ``break``), the producer is told to stop,
    the buffered batches are dropped and the thread is joined.
    """
    buffer: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failure(error))
        finally:  # here, in the thread that ran it: the source's own clean-up (open files, slides) runs now
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="h0mini-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while True:  # free the buffered batches (pinned memory on CUDA) now
            try:
                buffer.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=5)


@dataclass
class _Failure:
    error: BaseException


# -- results ------------------------------------------------------------------------------------------


def _assemble(
    parts: List[EmbeddedBatch], output: str, empty_dim: Optional[Dict[str, Tuple[int, ...]]] = None
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    names = ["cls", "registers", "patch_tokens"] if output == "all" else [output]
    parts = [p for p in parts if len(p.indices)]
    if not parts:
        shapes = empty_dim or {}
        arrays = {n: torch.zeros((0, *shapes.get(n, (0,)))) for n in names}
    else:
        order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
        arrays = {}
        for name in names:
            values = [p.features[name] for p in parts]
            if len({tuple(v.shape[1:]) for v in values}) > 1:
                raise InvalidTileError(
                    f"tiles of different sizes give {name} of different shapes; use embedding='cls', 'mean' or "
                    "'cls+mean', or a fixed input_size"
                )
            arrays[name] = torch.cat(values)[torch.from_numpy(order)]
    return arrays if output == "all" else arrays[output]


def _convert(result: Any, dtype: Any, return_tensors: bool) -> Any:
    if isinstance(result, dict):
        return {k: _convert(v, dtype, return_tensors) for k, v in result.items()}
    if return_tensors:
        return result.to(_torch_dtype(dtype))
    return result.numpy().astype(_numpy_dtype(dtype), copy=False)


def check_return_dtype(dtype: Any, return_tensors: bool) -> None:
    """Refuse a return dtype before any tile is embedded, not after."""
    (_torch_dtype if return_tensors else _numpy_dtype)(dtype)


def _numpy_dtype(dtype: Any) -> np.dtype:
    """``"float16"``, ``np.float16``, ``np.dtype("f2")`` or ``torch.float16`` alike, as numpy's dtype."""
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype
    try:
        numpy_dtype = np.dtype(name)
    except TypeError:
        numpy_dtype = None
    # ml_dtypes (imported by onnx) registers a numpy bfloat16 that torch's .numpy() cannot produce.
    if numpy_dtype is None or numpy_dtype.kind not in "biuf":
        raise InvalidArgumentError(
            f"return_dtype: numpy has no dtype {str(dtype).replace('torch.', '')!r}; use a numpy "
            "integer or float dtype, or pass return_tensors=True for torch dtypes like bfloat16", argument="return_dtype", accepted="a numpy integer or float dtype")
    return numpy_dtype


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)  # "bfloat16": a torch dtype numpy does not know
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise InvalidArgumentError(f"return_dtype {dtype!r} is not a dtype torch knows",
                                   argument="return_dtype", accepted="a torch or numpy dtype, or its name")
    return value


# -- progress ------------------------------------------------------------------------------------------


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and "IPKernelApp" in shell.get_ipython().config  # type: ignore[union-attr]
    except Exception:
        return False


def make_progress(progress: Optional[bool], total: Optional[int], *, unit: str = "tile", desc: str = "h0mini",
                  leave: bool = True):
    """A tqdm bar counting tiles; shown on a terminal or in a notebook unless ``progress`` says otherwise."""
    notebook = _in_notebook()
    show = progress if progress is not None else (notebook or sys.stderr.isatty())
    if notebook:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, disable=not show, unit=unit, desc=desc, leave=leave, file=sys.stderr, dynamic_ncols=True)
