"""The loader/prefetch pipeline: tiles in, prepared uint8 (or float) batches out, in input order.

Decoding (and resizing, when a tile is not the model's size) happens in DataLoader worker
processes or a background thread, so batch k+1 is prepared while the model runs batch k.
A stream of unknown length (the tiles of slide after slide) is fed lazily to the same workers,
which persist as long as the stream. On CUDA batches are pinned for a non-blocking copy.
Nothing here knows the model or its backend.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import InvalidTileError, SlideError
from .jpeg import ENCODED, read_encoded
from .preprocess import Preprocessing
from .results import SkippedTile
from .tiles import DatasetItems, TileRef, describe

Batch = Tuple[np.ndarray, list, List[SkippedTile], list]  # indices, pixel groups, skipped tiles, resize notes


def prepared_batches(source: Any, prepare: "_Prepare", *, batch_size: int, workers: int, pin: bool) -> Iterator[Batch]:
    """The batches of ``source`` (from ``read_input``), prepared by ``workers`` processes or a thread."""
    if workers > 0 and (source.length is not None or source.all_paths):
        # A stream of unknown length (e.g. the tiles of slide after slide) is fed to the same
        # workers as it is consumed: the sampler hands each worker (index, item) keys, so the
        # pool lives as long as the stream, not one slide.
        sized = source.length is not None
        loader = torch.utils.data.DataLoader(
            _PreparedDataset(source.items, prepare) if sized else _KeyedDataset(prepare),
            batch_size=batch_size,
            sampler=None if sized else _Keys(source.items),
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin,
            prefetch_factor=2,
            persistent_workers=False,
            worker_init_fn=_single_threaded_worker,
        )
        yield from loader
    else:
        yield from prefetch(_batched_in_thread(source.items, prepare, batch_size, pin), depth=2)


def worker_count(source: Any, num_workers: Any, *, batch_size: int, device: torch.device) -> int:
    """Worker processes for ``source``: ``num_workers``, or for ``"auto"`` what pays on ``device``."""
    if source.in_process_only:
        return 0  # e.g. a slide opened by the caller: its handle must not travel to (or fork into) a worker
    if num_workers != "auto":
        return max(0, int(num_workers))
    if not source.all_paths and not isinstance(source.items, DatasetItems):
        return 0  # in-memory tiles: a thread prepares them without copying them to another process
    if source.length is not None and source.length < 4 * batch_size:
        return 0  # starting processes costs more than decoding a few tiles in a thread
    cpus = available_cores()
    # On a CPU the model already uses every core: a worker process only oversubscribes them (2 cores:
    # 5-7x slower with one worker than with the decoding thread, benchmarks/cohort.py).
    return min(8, max(1, cpus - 1)) if device.type == "cuda" else 0


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


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
