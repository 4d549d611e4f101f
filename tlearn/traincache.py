"""Caches of what the frozen part of the network computes, per readable image: pooled
features or a frozen prefix's maps, in memory or memory-mapped on disk (tlearn.train)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tlearn.core.errors import DataError
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.runtime.loader import image_loader
from tlearn.runtime.transforms import eval_transform


class TensorCache:
    """Per-image tensors (pooled features or prefix maps) for the images that could be
    read, in input order: in memory, or in a memory-mapped file on disk."""

    def __init__(self, indices: np.ndarray, tensors: torch.Tensor | np.ndarray):
        self.indices = indices
        self.data = tensors

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(self.data, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(self.data[rows.numpy()]))
        return self.data[rows]


def compute_cache(
    fn: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str],
    data_config: dict,
    *,
    device: torch.device,
    batch_size: int,
    workers: int | None,
    skipped: list[Skipped],
    dtype: torch.dtype,
    flip: bool = False,
    disk_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    autocast=None,
    allow_empty: bool = False,
) -> tuple[TensorCache, TensorCache | None]:
    """fn(images) for every readable image (eval preprocessing), and for the mirrored
    images too when `flip`. `allow_empty`: no readable image gives empty caches (a rank's
    shard) instead of an error."""
    loader = image_loader(
        paths,
        eval_transform(data_config),
        batch_size=batch_size,
        workers=workers,
        min_size=resize_target(data_config),
        device=device,
    )
    idx: list[int] = []
    parts: list[torch.Tensor] = []
    flipped: list[torch.Tensor] = []
    done = 0
    with torch.inference_mode():
        for batch_idx, x, bad in loader:
            skipped.extend(Skipped(str(paths[i]), r) for i, r in bad)
            if x is not None:
                x = x.to(device, non_blocking=True)
                with autocast():
                    parts.append(fn(x).to("cpu", dtype))
                    if flip:
                        flipped.append(fn(x.flip(-1)).to("cpu", dtype))
                idx.extend(batch_idx)
            done += len(batch_idx) + len(bad)
            if progress is not None:
                progress(done, len(paths))
    indices = np.asarray(idx, dtype=np.int64)
    if not parts:
        if not allow_empty:
            raise DataError("no readable images to train on")
        return TensorCache(indices, torch.empty(0)), (
            TensorCache(indices, torch.empty(0)) if flip else None
        )

    def store(chunks, name):
        t = torch.cat(chunks)
        if disk_dir is None:
            return TensorCache(indices, t)
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        arr = np.lib.format.open_memmap(
            disk_dir / f"{name}.npy", mode="w+", dtype=np_dtype, shape=tuple(t.shape)
        )
        arr[:] = t.numpy()
        arr.flush()
        return TensorCache(indices, arr)

    return store(parts, "x"), (store(flipped, "x_flip") if flip else None)
