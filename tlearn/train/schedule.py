"""When things happen in a run: steps per epoch, the learning-rate schedule (warm-up and
cosine decay per phase: the head-only --freeze-epochs, then the rest), and the seeds of
each epoch (so a resumed run draws what the uninterrupted run drew)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def lr_factor(step: int, phases: Sequence[tuple[int, int]], warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, restarted at each phase (the head-only
    --freeze-epochs phase, then the rest), as fastai's fine_tune does."""
    for start, end in phases:
        if start <= step < end:
            s, n = step - start, end - start
            w = min(warmup, max(n - 1, 0))
            if s < w:
                return (s + 1) / (w + 1)
            return 0.5 * (1 + math.cos(math.pi * (s - w) / max(n - w, 1)))
    return 0.0


@dataclass
class Schedule:
    drop_lone: bool  # a last batch of one image is dropped (BatchNorm needs two rows)
    steps_per_epoch: int
    phases: list[tuple[int, int]]
    warmup_steps: int

    @classmethod
    def plan(
        cls, n_images: int, batch_size: int, *, epochs: int, freeze_epochs: int, warmup: float
    ) -> Schedule:
        drop_lone = n_images % batch_size == 1 and n_images > 1
        spe = n_images // batch_size if drop_lone else -(-n_images // batch_size)
        f = freeze_epochs
        phases = [(0, f * spe), (f * spe, epochs * spe)] if f else [(0, epochs * spe)]
        return cls(drop_lone, spe, phases, int(round(warmup * spe)))

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int, lr: float) -> float:
        """Set every param group's rate for `step`; returns the head's (`lr` scaled)."""
        f = lr_factor(step, self.phases, self.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return lr * f


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31 - 1)


def seed_epoch(seed: int, epoch: int, dist=None) -> tuple[torch.Generator, torch.Generator]:
    """(the epoch's order generator, the same on every rank; the generator of this rank's
    own draws). Seeds torch's and Python's global generators (augmentation, dropout) per
    rank too. `dist`: train.dist.Dist under torchrun, else None."""
    seed = epoch_seed(seed, epoch)
    g = torch.Generator().manual_seed(seed)
    local = seed if dist is None else dist.seed(seed)
    torch.manual_seed(local)
    random.seed(local)
    g_local = g if dist is None else torch.Generator().manual_seed(local)
    return g, g_local
