"""The public API: ``embed_tiles()`` and ``TileEmbedder``, tiles in, embeddings out, in input order.

Three parts, one job each: the loader/prefetch pipeline (``h0mini.pipeline``) prepares uint8
batches in worker processes or a thread while the model runs the previous batch; a backend
(``h0mini.backend``: torch, or ONNX Runtime for an export) runs the forward pass; pooling and the
assembly of results are ``h0mini.results``. This module resolves the model and the settings and
drives the three. On CUDA the uint8 batch is pinned and copied non-blocking (4x less traffic than
float32), then converted and normalised on the GPU; the forward pass runs under
``inference_mode`` with fp16 autocast (the model card's choice). On CPU the default is bf16
autocast where the processor has native bf16 (AVX512-BF16 or AMX), fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .backend import backend_for, loading_device
from .deprecation import take_options
from .errors import InvalidArgumentError, InvalidTileError, shown
from .interrupt import started_as_command
from .jpeg import JPEG_DECODERS, decode_on_device
from .model import default_weights, load_model
from .pipeline import TRIM_EVERY, Batch, _Prepare, prepared_batches, release_freed_memory, worker_count
from .preprocess import Preprocessing
from .results import (EmbeddedBatch, SkippedTile, SkippedTilesWarning, assemble, check_return_dtype, convert,
                      make_progress, pool_tokens)
from .tiles import read_input
from .wording import say

logger = logging.getLogger(__name__)

OUTPUTS = ("cls+mean", "cls", "mean", "patch_tokens", "all")
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 8}  # tiles per forward pass (measured fastest on each)
ModelLike = Union[torch.nn.Module, str, os.PathLike, None]


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
            error.partial = convert(assemble(parts, output), dtype, return_tensors)  # type: ignore[attr-defined]
        raise
    if source.single and skipped:  # one tile in and it was bad: there is nothing to return
        raise InvalidTileError(skipped[0].reason, index=0, source=skipped[0].source)
    result = convert(assemble(parts, output, empty_dim=embedder.output_shape()), dtype, return_tensors)
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
        self.backend = backend_for(model, device=device, precision=precision, compile=compile)
        self.device = self.backend.device
        self.model = self.backend.model
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        self.embedding = embedding
        self.batch_size = _positive(batch_size, "batch_size") or DEFAULT_BATCH_SIZE["cuda" if self.device.type == "cuda" else "cpu"]
        self._micro_batch = self.batch_size
        self.num_workers = num_workers
        self.preprocessing = Preprocessing.from_model(self.model, input_size)
        self.weights_dtype = self.backend.weights_dtype
        self.autocast_dtype = self.backend.autocast_dtype

    @property
    def output(self) -> str:
        """The embedding kind (``embedding``), under its previous name."""
        return self.embedding

    @property
    def precision(self) -> str:
        """What runs the forward pass, as recorded with results: ``"fp32"``, ``"bf16"``, ``"onnxruntime-int8"``..."""
        return self.backend.precision

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
        self.backend.start_run()
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

    def _prepared_batches(self, source: Any) -> Iterator[Batch]:
        prepare = _Prepare(self.preprocessing, encoded_jpegs=self.jpeg_decode == "device")
        return prepared_batches(source, prepare, batch_size=self.batch_size, workers=self._workers(source),
                                pin=self.device.type == "cuda")

    def _workers(self, source: Any) -> int:
        return worker_count(source, self.num_workers, batch_size=self.batch_size, device=self.device)

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
        with torch.inference_mode(), self.backend.autocast():
            x = self.preprocessing.normalize(pixels)
            tokens = self.backend.tokens(x, pad_to=self._micro_batch)
            if tokens.ndim != 3:
                raise InvalidArgumentError(
                    f"the model returned shape {tuple(tokens.shape)}; embed_tiles needs its tokens (B, T, D): "
                    "use a timm ViT (forward_features) or a model with global_pool=''",
                    argument="model", accepted="a model whose forward_features returns tokens (B, T, D)")
            pooled = pool_tokens(tokens.float(), self.num_prefix_tokens, self.output)
        # A copy, never a view: a view of the CLS row would keep the whole token tensor alive.
        return {name: value.to("cpu", copy=True) for name, value in pooled.items()}


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
        target = loading_device(source, device)
        key = (source, _file_stamp(source), revision, _token_key(token), cache_dir, target)
        with self._lock:
            if self._key != key or self._model is None:
                self._key = self._model = None  # the previous model is freed before the next loads
                self._model = load_model(weights, revision=revision, token=token, cache_dir=cache_dir,
                                         device=target)
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


def _skip_hint() -> str:
    return say('on_error="skip" leaves unreadable tiles out and lists them',
               "with `h0mini embed`, --on-error skip leaves unreadable tiles out and lists them")


def _positive(value: Optional[int], name: str) -> Optional[int]:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return value
