"""Which slides this process embeds: ``--shard K/N``, or filled in from torchrun or a SLURM array.

Slides are sorted by path and dealt round-robin, so every shard of the same input list gets the
same slides whichever machine it runs on, and N shards together cover each slide exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int
    origin: str  # "argument", "torchrun", "slurm" or "single"
    local_rank: Optional[int] = None  # torchrun: the GPU of this process

    def select(self, slides: Sequence[T]) -> list:
        return [s for i, s in enumerate(slides) if i % self.count == self.index]

    @property
    def label(self) -> str:
        return "" if self.count == 1 else f"shard-{self.index}-of-{self.count}"


def parse_shard(text: str) -> Shard:
    """``"K/N"`` with 0 <= K < N, e.g. ``0/4`` ... ``3/4``."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard takes K/N (0-based K, e.g. 0/4 for the first of four), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard K/N needs N >= 1 and 0 <= K < N, got {text!r}")
    return Shard(index, count, "argument")


def resolve_shard(shard: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Shard:
    """An explicit ``K/N``, else torchrun's RANK/WORLD_SIZE, else a SLURM array, else everything."""
    env = os.environ if environ is None else environ
    if shard:
        return parse_shard(shard)
    if "WORLD_SIZE" in env and "RANK" in env:
        local = env.get("LOCAL_RANK")
        return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun", int(local) if local is not None else None)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # Arrays may start at 1 (--array=1-8): count from the array's first task id.
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        index, count = int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= index < count:
            raise ValueError(
                f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} is outside an array of {count} tasks starting at "
                f"{first}; pass --shard K/N explicitly"
            )
        return Shard(index, count, "slurm")
    return Shard(0, 1, "single")
