"""Tiles in, multi-crop batches out: folders, list files and WebDataset tar shards, streamed.

Two kinds of source, never mixed in one run:

* **Indexed** (tile folders, ``.txt`` list files): the global sample stream is a
  seeded permutation of all tiles per epoch (a Feistel bijection, so 40M tiles
  cost no memory). Step ``s`` of rank ``r`` takes positions
  ``s*B + r*b ... s*B + (r+1)*b - 1`` of that stream (``B`` global, ``b`` per-rank
  batch). Ranks and workers therefore never duplicate a tile within an epoch,
  and the batches of a step are the same whatever the number of ranks: with
  per-tile seeds for crops and masks, 2 processes see exactly what 1 process sees.
* **Shards** (WebDataset ``.tar``, brace patterns such as ``tiles-{000000..000999}.tar``,
  globs, ``pipe:``/``http(s)://`` URLs): each epoch the shard list is permuted with
  the seed and dealt to the ``world x workers`` consumers (``perm[c::C]``), each
  shard's samples are permuted with the seed, and each consumer streams its own
  shards, so no sample is read twice in an epoch. Needs at least as many shards
  as consumers, which is checked before training.

Shards are read with ``tarfile`` rather than ``webdataset``'s pipeline: local
shards are indexed from their headers (no data read), which gives an exact,
cheap resume position and in-shard shuffling without a shuffle buffer whose
state could not be restored. ``webdataset.gopen`` opens remote URLs, read one
shard at a time into memory. Everything is a pure function of (seed, step), so
a resumed run reads exactly the batches the killed run would have read.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import os
import random
import re
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import OptionalDependencyError
from ..tiles import to_rgb
from .augment import MultiCrop
from .config import ConfigError, DistillConfig
from .masking import MaskingGenerator, sample_mask

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
LIST_SUFFIXES = (".txt", ".lst", ".list")
_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): seeds for tiles, epochs, shards."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


class FeistelPermutation:
    """A seeded bijection of ``range(n)`` computed per index (cycle-walking Feistel network)."""

    def __init__(self, n: int, key: int, rounds: int = 4):
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [mix(key, r) for r in range(rounds)]

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        x = index
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (mix(right, k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


# ---------------------------------------------------------------- sources


@dataclass
class Sources:
    """Resolved data: either ``files`` (indexed) or ``shards``."""

    files: List[str]
    shards: List[str]

    @property
    def kind(self) -> str:
        return "shards" if self.shards else "files"

    def summary(self) -> str:
        if self.shards:
            return f"{len(self.shards)} WebDataset shards"
        return f"{len(self.files)} tiles"


def _is_url(text: str) -> bool:
    return bool(re.match(r"^[a-z0-9+]+:", text)) and not re.match(r"^[A-Za-z]:[\\/]", text)


def brace_expand(pattern: str) -> List[str]:
    """``a{00..02}b{x,y}`` -> a00bx, a00by, a01bx, ... (zero padding kept), as WebDataset patterns use."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        a, b = numeric.groups()
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        options = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [e for option in options for e in brace_expand(head + option + tail)]


def resolve_sources(sources: Sequence[str]) -> Sources:
    """Expand ``data.sources`` into tile paths or shard URLs; fail naming the field when empty or missing."""
    files: List[str] = []
    shards: List[str] = []
    for source in sources:
        text = str(source)
        if ".tar" in text or (_is_url(text) and not Path(text).exists()):
            expanded = [p for part in brace_expand(text) for p in (sorted(glob.glob(part)) if "*" in part else [part])]
            for shard in expanded:
                if not _is_url(shard) and not Path(shard).is_file():
                    raise ConfigError("data.sources", f"shard {shard!r} (from {text!r}) does not exist")
            if not expanded:
                raise ConfigError("data.sources", f"the pattern {text!r} matches no shard")
            shards.extend(expanded)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ConfigError("data.sources", f"the folder {text!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            entries = [ln for ln in lines if ln and not ln.startswith("#")]
            if not entries:
                raise ConfigError("data.sources", f"the list file {text!r} is empty")
            resolved = [e if os.path.isabs(e) else str(path.parent / e) for e in entries]
            missing = [e for e in resolved[:1000] if not os.path.exists(e)]
            if missing:
                raise ConfigError("data.sources", f"the list file {text!r} names missing tiles, e.g. {missing[0]!r}")
            files.extend(resolved)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(str(path))
        else:
            raise ConfigError("data.sources", f"{text!r} is neither a folder, a list file (.txt), an image nor a tar shard")
    if files and shards:
        raise ConfigError("data.sources", "mixes tile folders/lists with tar shards; use one kind per run")
    if not files and not shards:
        raise ConfigError("data.sources", "no tiles found")
    return Sources(files=files, shards=shards)


def decode(data, source: str) -> torch.Tensor:
    """Image bytes or path -> uint8 (3, H, W)."""
    handle = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(handle) as image:
        array = np.asarray(to_rgb(image))  # the package's rule: alpha on white glass, 16-bit scaled
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- shards


def _sample_key(name: str) -> Tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name, extension = the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _open_remote(url: str):
    try:
        from webdataset import gopen
    except ImportError as error:
        raise OptionalDependencyError("webdataset", extra="distill", feature="Reading remote tar shards") from error
    return gopen(url, "rb")


class Shard:
    """One tar shard: its image samples in member order; data read lazily for local files."""

    def __init__(self, url: str):
        self.url = url
        self.names: List[str] = []
        self._members: List[tarfile.TarInfo] = []
        self._data: List[bytes] = []
        self._first_readable: Optional[torch.Tensor] = None
        if _is_url(url):
            with _open_remote(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    key, ext = _sample_key(member.name)
                    if member.isfile() and "." + ext.split(".")[-1] in IMAGE_SUFFIXES:
                        self.names.append(key)
                        self._data.append(tar.extractfile(member).read())
        else:
            with tarfile.open(url, mode="r:*") as tar:  # .tar, or .tar.gz and friends (slower to seek)
                for member in tar.getmembers():  # headers only: data is skipped by seeking
                    key, ext = _sample_key(member.name)
                    if member.isfile() and "." + ext.split(".")[-1] in IMAGE_SUFFIXES:
                        self.names.append(key)
                        self._members.append(member)

    def __len__(self) -> int:
        return len(self.names)

    def first_readable(self) -> torch.Tensor:
        """The stand-in for an unreadable sample (decoded once per shard)."""
        if self._first_readable is None:
            for _, data in self.read(range(len(self))):
                try:
                    self._first_readable = decode(data, self.url)
                    break
                except (OSError, ValueError):
                    continue
            else:
                raise ConfigError("data.sources", f"no sample of the shard {self.url!r} can be read")
        return self._first_readable

    def read(self, indices: Sequence[int]) -> Iterator[Tuple[int, bytes]]:
        if self._data:
            for i in indices:
                yield i, self._data[i]
            return
        with tarfile.open(self.url, mode="r:*") as tar:
            for i in indices:
                yield i, tar.extractfile(self._members[i]).read()


# ---------------------------------------------------------------- the stream


MAX_UNREADABLE_IN_A_ROW = 16  # beyond that the data is gone (an unmounted disk), not a few bad files


class TileStream(IterableDataset):
    """Yields one collated per-rank batch per step, from ``start_step`` to ``end_step`` (exclusive).

    With DataLoader workers, worker ``w`` produces steps ``start_step + w``,
    ``start_step + w + k``...; the DataLoader returns them in order.
    """

    def __init__(self, sources: Sources, transform: MultiCrop, *, seed: int, rank: int, world_size: int,
                 local_batch: int, start_step: int, end_step: int, shuffle: bool,
                 mask_grid: Optional[Tuple[int, int]], mask_probability: float = 0.5,
                 mask_ratio: Tuple[float, float] = (0.1, 0.5)):
        self.sources = sources
        self.transform = transform
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.local_batch, self.start_step, self.end_step = local_batch, start_step, end_step
        self.shuffle = shuffle
        self.mask_grid, self.mask_probability, self.mask_ratio = mask_grid, mask_probability, tuple(mask_ratio)
        self._masker = MaskingGenerator(mask_grid) if mask_grid else None
        self._perms: Dict[int, FeistelPermutation] = {}

    # -- indexed sources
    def file_for(self, position: int) -> Tuple[int, int]:
        """Global stream position -> (tile index, epoch)."""
        n = len(self.sources.files)
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset, epoch
        if epoch not in self._perms:
            self._perms = {epoch: FeistelPermutation(n, mix(self.seed, epoch, 0xF11E))}
        return self._perms[epoch](offset), epoch

    def _indexed_batch(self, step: int) -> List[Tuple[torch.Tensor, int, int]]:
        out = []
        global_batch = self.local_batch * self.world_size
        first = step * global_batch + self.rank * self.local_batch
        for position in range(first, first + self.local_batch):
            index, epoch = self.file_for(position)
            attempts = min(MAX_UNREADABLE_IN_A_ROW, len(self.sources.files))
            for attempt in range(attempts):
                path = self.sources.files[(index + attempt) % len(self.sources.files)]
                try:
                    tile = decode(path, path)
                    break
                except (OSError, ValueError) as error:
                    logger.warning("skipping unreadable tile %r: %s", path, error)
            else:
                raise ConfigError("data.sources", f"{attempts} tiles in a row from "
                                  f"{self.sources.files[index]!r} on cannot be read: is the data still there (mounted)?")
            out.append((tile, mix(self.seed, epoch, index), index))
        return out

    # -- shards
    def _consumer_samples(self, consumer: int, n_consumers: int, skip: int) -> Iterator[Tuple[torch.Tensor, int, int]]:
        shards = self.sources.shards
        epoch = 0
        while True:
            order = list(range(len(shards)))
            if self.shuffle:
                random.Random(mix(self.seed, epoch, 0x5A4D)).shuffle(order)
            mine = order[consumer::n_consumers]
            for shard_index in mine:
                shard = Shard(shards[shard_index])
                members = list(range(len(shard)))
                if self.shuffle:
                    random.Random(mix(self.seed, epoch, shard_index)).shuffle(members)
                if skip >= len(members):
                    skip -= len(members)
                    continue
                members, skip = members[skip:], 0
                for i, data in shard.read(members):
                    try:
                        tile = decode(data, shard.url)
                    except (OSError, ValueError) as error:
                        # One sample per position, readable or not: a resume skips positions and must
                        # land on the same sample as the uninterrupted stream.
                        logger.warning("unreadable sample %r of %r (%s): using the shard's first readable tile",
                                       shard.names[i], shard.url, error)
                        tile = shard.first_readable()
                    yield tile, mix(self.seed, epoch, shard_index, i), shard_index * (1 << 32) + i
            epoch += 1

    # -- common
    def _sample(self, tile: torch.Tensor, sample_seed: int) -> Dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(sample_seed & ((1 << 63) - 1))
        crops = self.transform(tile, generator)
        if self._masker is not None:
            rng = random.Random(mix(sample_seed, 0x3A5C))
            crops["masks"] = torch.stack([
                sample_mask(self.mask_grid, self.mask_probability, self.mask_ratio, rng, self._masker)
                for _ in range(crops["global_crops"].shape[0])
            ])
        return crops

    def _collate(self, step: int, samples: List[Tuple[torch.Tensor, int, int]]) -> Dict[str, torch.Tensor]:
        items = [self._sample(tile, seed) for tile, seed, _ in samples]
        batch = {"step": torch.tensor(step), "indices": torch.tensor([idx for _, _, idx in samples], dtype=torch.int64)}
        for key in items[0]:
            stacked = torch.stack([item[key] for item in items])  # (b, n_crops, ...)
            batch[key] = stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])  # crop-major, as DINOv2
        return batch

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, k = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = range(self.start_step + worker, self.end_step, k)
        if not self.sources.shards:
            for step in steps:
                yield self._collate(step, self._indexed_batch(step))
            return
        role = (self.start_step + worker) % k  # consumer role is tied to step % k, so resuming keeps it
        consumed_batches = max(0, -(-(self.start_step - role) // k))
        n_consumers = self.world_size * k
        stream = self._consumer_samples(self.rank * k + role, n_consumers, consumed_batches * self.local_batch)
        for step in steps:
            yield self._collate(step, [next(stream) for _ in range(self.local_batch)])


def _worker_init(_: int) -> None:
    """One thread per worker; the stop signals are the main process's to handle.

    ``timeout``, SLURM and Ctrl-C signal the whole process group: a worker killed by
    them would take the main process down before it checkpoints, so workers ignore
    them and the main process finishes its step, saves and shuts the workers down.
    """
    torch.set_num_threads(1)
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_loader(config: DistillConfig, sources: Sources, *, rank: int, world_size: int, local_batch: int,
                 start_step: int, patch_size: int, pin_memory: bool = False) -> DataLoader:
    """The per-rank DataLoader for steps ``start_step .. train.iterations - 1``."""
    workers = config.data.num_workers
    if sources.shards and len(sources.shards) < world_size * max(1, workers):
        raise ConfigError("data.sources", f"{len(sources.shards)} shards cannot feed {world_size} ranks x "
                          f"{max(1, workers)} workers without duplicates; write more, smaller shards or lower data.num_workers")
    crops = config.crops
    if config.objective.dinov2 == 0:  # only the DINO loss uses local crops: do not make them for nothing
        crops = dataclasses.replace(crops, n_local=0)
    transform = MultiCrop(crops, config.augment, config.data.mean, config.data.std)
    grid = config.crops.global_size // patch_size
    use_masks = config.objective.dinov2 > 0 and config.dinov2.ibot_weight > 0
    stream = TileStream(
        sources, transform, seed=config.seed, rank=rank, world_size=world_size, local_batch=local_batch,
        start_step=start_step, end_step=config.train.iterations, shuffle=config.data.shuffle,
        mask_grid=(grid, grid) if use_masks else None, mask_probability=config.dinov2.mask_probability,
        mask_ratio=config.dinov2.mask_ratio,
    )
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
