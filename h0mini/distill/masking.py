"""iBOT block masks: which patch positions of a global crop carry the patch loss.

The block sampler is BEiT's (also in DINOv2's ``dinov2/data/masking.py``):
rectangles of random area and aspect ratio are added until the target count is
reached. Unlike DINOv2's collate, each tile draws its own mask from its own seed
(probability ``mask_probability`` of having positions at all, ratio uniform in
``mask_ratio``), so a tile gets the same mask whatever the batch, rank or worker
layout: the property that makes a 2-process run equal a 1-process run.
In distillation mode the student is *not* masked; the mask only selects positions.
"""

from __future__ import annotations

import math
import random
from typing import Tuple

import torch


class MaskingGenerator:
    """Block masks on a ``(height, width)`` patch grid."""

    def __init__(self, grid: Tuple[int, int], min_num_patches: int = 4, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: torch.Tensor, max_mask_patches: int, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max(self.min_num_patches, max_mask_patches))
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < w < self.width and 0 < h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top: top + h, left: left + w]
                num_masked = int(block.sum())
                if 0 < h * w - num_masked <= max_mask_patches:
                    delta = h * w - num_masked
                    block.fill_(True)
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int, rng: random.Random) -> torch.Tensor:
        """A (height, width) bool mask with at most ``num_masking_patches`` True (blocks of >= 4 when possible)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, num_masking_patches - count, rng)
            if delta == 0:
                break
            count += delta
        if count == 0 and num_masking_patches > 0:  # grid too small for a block: take single positions
            flat = mask.view(-1)
            for index in rng.sample(range(self.num_patches), min(num_masking_patches, self.num_patches)):
                flat[index] = True
        return mask


def sample_mask(grid: Tuple[int, int], probability: float, ratio: Tuple[float, float], rng: random.Random,
                generator: MaskingGenerator | None = None) -> torch.Tensor:
    """One tile's flat (height*width,) mask: empty with probability ``1 - probability``."""
    generator = generator or MaskingGenerator(grid)
    if rng.random() >= probability:
        return torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    n = int(round(rng.uniform(*ratio) * grid[0] * grid[1]))
    return generator(max(n, 1), rng).view(-1)
