"""torch's DataLoader over image files: items that never raise for a bad image (the
reason travels with the batch), optionally keyed by content for the feature cache."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from tlearn.core.system import die_with_parent
from tlearn.data.decode import decode_one, default_workers


class ImageDataset:
    """(index, tensor | None, reason | None) per image; never raises for a bad image.
    A map-style dataset for torch's DataLoader (which needs only __len__/__getitem__)."""

    def __init__(self, paths: Sequence[str], transform, min_size: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.paths)

    keyed = False  # KeyedImageDataset: also the content key of each decoded file

    def __getitem__(self, i: int):

        item, reason, key = decode_one(self.paths[i], self.transform, self.min_size, self.keyed)
        return (i, item, reason, key) if self.keyed else (i, item, reason)


def _stack(items):
    """One tensor from per-image tensors or uint8 arrays (tlearn.pixels.PilSteps)."""
    # torch only when a DataLoader is built: warm runs import this module
    import torch

    if isinstance(items[0], np.ndarray):
        return torch.from_numpy(np.stack(items))
    return torch.stack(items)


def collate_skipping(batch):
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, r) for i, _, r in batch if r is not None]
    idx = [i for i, _ in ok]
    x = _stack([t for _, t in ok]) if ok else None
    return idx, x, bad


class KeyedImageDataset(ImageDataset):
    """Like ImageDataset, and hashes each file's bytes (the feature cache key) from the very
    bytes it decodes, so a key can never name features of other content.
    Items: (index, tensor | None, reason | None, key | None)."""

    keyed = True


def collate_keyed(batch):
    """(indices, stacked tensors, bad, content keys of the decoded ones)."""
    ok = [(i, t, k) for i, t, _, k in batch if t is not None]
    bad = [(i, r) for i, _, r, _ in batch if r is not None]
    x = _stack([t for _, t, _ in ok]) if ok else None
    return [i for i, _, _ in ok], x, bad, [k for _, _, k in ok]


def _worker_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def torch_batches(paths, transform, min_size, batch_size, n_workers, cache, dev):
    """torch's DataLoader (pinned memory for CUDA); items as tlearn.decode's batches."""
    loader = image_loader(
        paths,
        transform,
        batch_size=batch_size,
        workers=n_workers,
        min_size=min_size,
        device=dev,
        keyed=cache is not None,
    )
    for item in loader:
        if cache is not None:
            yield item
        else:
            yield (*item, None)


def image_loader(
    paths,
    transform,
    *,
    batch_size,
    workers,
    order=None,
    generator=None,
    min_size=None,
    device=None,
    batches=None,
    keyed: bool = False,
):
    """torch's DataLoader over ImageDataset (KeyedImageDataset with `keyed`): batches of
    (indices, stacked tensors, [(index, reason)][, keys]); `order`: a sampler, `batches`:
    explicit lists of indices, one per batch; pinned memory for CUDA."""
    # torch only when a DataLoader is built: warm runs import this module
    from torch.utils.data import DataLoader

    dataset = KeyedImageDataset if keyed else ImageDataset
    ds = dataset(paths, transform, min_size=min_size)
    n_workers = default_workers(len(paths), batch_size) if workers is None else workers
    common = {
        "num_workers": n_workers,
        # workers end with this process, even when it is killed (torch's own check of the
        # parent takes seconds, and none at all while a worker is busy decoding)
        "worker_init_fn": functools.partial(_worker_init, os.getpid()) if n_workers else None,
        "collate_fn": collate_keyed if keyed else collate_skipping,
        "generator": generator,
        "pin_memory": device is not None and device.type == "cuda",
        "persistent_workers": False,
    }
    if batches is not None:
        return DataLoader(ds, batch_sampler=batches, **common)
    return DataLoader(ds, batch_size=batch_size, sampler=order, shuffle=False, **common)
