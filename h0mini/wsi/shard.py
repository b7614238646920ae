"""Which slides this process starts with: ``--shard K/N``, or filled in from torchrun, srun and SLURM arrays.

Correctness never rests on shards: every slide is claimed by one process (``claims``). Shards only
spread the work. Slides are sorted by path and dealt round-robin, so every process of a job
agrees on the shares whatever machine it runs on.

- ``--shard K/N`` (``origin="argument"``): this process embeds its share and nothing else.
- From the environment, the launchers compose: a SLURM array task ``a`` of ``A`` running ranks
  ``r`` of ``R`` (torchrun's RANK/WORLD_SIZE, else srun's SLURM_PROCID/SLURM_NTASKS) is share
  ``a * R + r`` of ``A * R``. Such a process embeds its own share first, then helps with the
  others' slides that nobody has claimed, so a sparse array (``--array=1,3,7``), a task that
  never starts or a slow node leaves no slide behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, TypeVar

from ..errors import InvalidArgumentError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int
    origin: str  # "argument", "single", or the launchers it came from: "torchrun", "srun", "slurm-array", ...
    local_rank: Optional[int] = None  # the GPU of this process on its node (torchrun LOCAL_RANK, SLURM_LOCALID)

    def select(self, slides: Sequence[T]) -> List[T]:
        """This process's own share."""
        return [s for i, s in enumerate(slides) if i % self.count == self.index]

    def order(self, slides: Sequence[T]) -> List[T]:
        """The slides this process walks: its share, then (unless the share was asked for) the
        other shares in turn, starting with the next one, so that helpers spread out."""
        if self.origin == "argument" or self.count == 1:
            return self.select(slides)
        shares = [Shard((self.index + k) % self.count, self.count, self.origin).select(slides)
                  for k in range(self.count)]
        return [s for share in shares for s in share]

    @property
    def label(self) -> str:
        return "" if self.count == 1 else f"shard {self.index} of {self.count}"


def parse_shard(text: str) -> Shard:
    """``"K/N"`` with 0 <= K < N, e.g. ``0/4`` ... ``3/4``."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise InvalidArgumentError(
            f"--shard takes K/N (0-based K, e.g. 0/4 for the first of four), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InvalidArgumentError(f"--shard K/N needs N >= 1 and 0 <= K < N, got {text!r}")
    return Shard(index, count, "argument")


def resolve_shard(shard: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Shard:
    """An explicit ``K/N``, else the composition of a SLURM array and torchrun or srun ranks, else all."""
    env = os.environ if environ is None else environ
    if shard:
        return parse_shard(shard)
    origins = []
    rank, ranks, local = 0, 1, None
    if _int(env, "WORLD_SIZE") and _int(env, "RANK") is not None:
        rank, ranks, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
        origins.append("torchrun")
    elif (_int(env, "SLURM_NTASKS") or 1) > 1 and _int(env, "SLURM_PROCID") is not None:
        rank, ranks, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        origins.append("srun")
    task, tasks = 0, 1
    if _int(env, "SLURM_ARRAY_TASK_ID") is not None and (_int(env, "SLURM_ARRAY_TASK_COUNT") or 0) > 0:
        tasks = _int(env, "SLURM_ARRAY_TASK_COUNT")
        first = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        # --array=1-8 starts at 1; --array=0-15:4 steps; a sparse list (--array=1,3,7) gives ids past the
        # count: folded in, harmless since the others' slides are helped with afterwards.
        task = ((_int(env, "SLURM_ARRAY_TASK_ID") - first) // max(step, 1)) % tasks
        origins.insert(0, "slurm-array")
    if not origins:
        return Shard(0, 1, "single")
    if not 0 <= rank < ranks:
        raise InvalidArgumentError(f"rank {rank} is outside {ranks} processes ({'+'.join(origins)}); pass --shard K/N")
    return Shard(task * ranks + rank, tasks * ranks, "+".join(origins), local)


def _int(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
