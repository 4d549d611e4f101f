"""The training batches of an epoch, as (inputs, labels) pairs: from the caches of the
frozen part (features or prefix maps, with flips), or decoded and augmented images; under
torchrun each rank gets its slice of every global batch. Every feeder draws the epoch's
order from the generator `g`, the same on every rank."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.runtime.loader import image_loader
from tlearn.train.build import Setup
from tlearn.train.frozen import Caches


class SkipLog:
    """The run's unreadable images (setup.skipped), each listed once in the order found;
    `new`: those this epoch found. Under torchrun each rank finds its own: share() lists
    every rank's on every rank."""

    def __init__(self, skipped: list[Skipped]):
        self.skipped = skipped
        self.seen = {s.path for s in skipped}
        self.new: list[Skipped] = []

    def add(self, path: str, reason: str) -> None:
        if path not in self.seen:
            self.seen.add(path)
            self.skipped.append(Skipped(path, reason))
            self.new.append(Skipped(path, reason))

    def share(self, dist) -> None:
        """Add what the other ranks found (a collective: every rank calls it)."""
        for info in dist.gather([[sk.path, sk.reason] for sk in self.new]):
            for path, reason in info:
                if path not in self.seen:
                    self.seen.add(path)
                    self.skipped.append(Skipped(path, reason))


Batches = Iterator[tuple[torch.Tensor | None, torch.Tensor]]


def cached_batches(setup: Setup, caches: Caches, g: torch.Generator) -> Batches:
    cache = caches.train
    n = len(cache)
    order = torch.randperm(n, generator=g)
    flip_pick = torch.rand(n, generator=g) < 0.5
    bs = setup.batch_size
    stop = n - 1 if n % bs == 1 and n > 1 else n
    for i in range(0, stop, bs):
        rows = order[i : i + bs]
        if setup.dist is not None:  # this rank's slice of the global batch (maybe empty)
            rows = setup.dist.mine(rows)
        x = cache.get(rows)
        if setup.augment == "flip":
            pick = flip_pick[rows]
            if caches.train_flip is not None:  # features of the mirrored images: exact
                x = torch.where(pick[:, None], caches.train_flip.get(rows), x)
            else:  # mirrored prefix maps: approximate
                x = torch.where(pick.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)
        y = setup.y_train[torch.as_tensor(cache.indices[rows.numpy()])]
        yield x, y


def image_batches(
    setup: Setup, transform, g: torch.Generator, g_local: torch.Generator, skips: SkipLog
) -> Batches:
    n = len(setup.train_set)
    order = torch.randperm(n, generator=g).tolist()
    if setup.schedule.drop_lone:
        order = order[:-1]
    if setup.dist is not None:
        yield from _rank_image_batches(setup, transform, order, g_local, skips)
        return
    paths = setup.train_set.paths
    loader = image_loader(
        paths,
        transform,
        batch_size=setup.batch_size,
        workers=setup.run.workers,
        order=order,
        generator=g,
        min_size=resize_target(setup.network.data_config),
        device=setup.device,
    )
    for idx, x, bad in loader:
        for i, r in bad:
            skips.add(str(paths[i]), r)
        if x is None:
            continue
        yield x, setup.y_train[torch.as_tensor(idx)]


def _rank_image_batches(
    setup: Setup, transform, order: list[int], g_local: torch.Generator, skips: SkipLog
) -> Batches:
    """This rank's slice of every global batch, one item per global step; (None, empty
    labels) where the slice is empty or none of its images could be read."""
    bs, d = setup.batch_size, setup.dist
    slices = [list(d.mine(order[i : i + bs])) for i in range(0, len(order), bs)]
    paths = setup.train_set.paths
    loader = image_loader(
        paths,
        transform,
        batch_size=bs // d.world,
        workers=setup.run.workers,
        batches=[sl for sl in slices if sl],
        generator=g_local,
        min_size=resize_target(setup.network.data_config),
        device=setup.device,
    )
    batches = iter(loader)
    none = torch.zeros(0, dtype=torch.long)
    for sl in slices:
        if not sl:
            yield None, none
            continue
        idx, x, bad = next(batches)
        for i, r in bad:
            skips.add(str(paths[i]), r)
        if x is None:
            yield None, none
        else:
            yield x, setup.y_train[torch.as_tensor(idx)]


def epoch_batches(
    setup: Setup,
    caches: Caches,
    transform,
    g: torch.Generator,
    g_local: torch.Generator,
    skips: SkipLog,
) -> Batches:
    """The feeder of the run's mode."""
    if setup.mode == "images":
        return image_batches(setup, transform, g, g_local, skips)
    return cached_batches(setup, caches, g)
