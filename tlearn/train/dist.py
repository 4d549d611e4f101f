"""Data-parallel fine-tuning under torchrun: the collective operations the train package
uses when `fit --head linear|mlp` runs as several processes (RANK/WORLD_SIZE set); the
training steps themselves are train.ddp.

The design keeps a torchrun run equal to a single-process run with the same global
--batch-size and seed:
- every rank draws the same epoch permutation from the shared seed; each global batch is
  cut into WORLD_SIZE contiguous slices and rank R trains on slice R;
- the loss of a slice is its share of the global batch's mean loss (the global
  denominator is all-reduced each step), so DistributedDataParallel's gradient average
  is the single-process gradient of the global batch, uneven or skipped images included;
- caches of frozen layers are computed in shards of whole batches and shared, so every
  rank holds the cache a single process builds; validation runs in shards and its sums
  and predictions are gathered, so every rank takes the same early-stopping decisions;
- only rank 0 writes; every write is followed by a status exchange, so an error on any
  rank fails every rank with one message (see scale.group.raise_first_failure).

Augmentation and dropout draw from a per-rank, per-epoch seed: reproducible, but not the
draws of a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from tlearn.core.errors import DataError, UsageError
from tlearn.core.system import DistEnv
from tlearn.scale.group import ProcessGroup, raise_first_failure, status_of
from tlearn.scale.shard import Shard

T = TypeVar("T")
CHUNK_BYTES = 64 << 20  # cache rows are shared in broadcasts of at most this size


def check_one_gpu_per_process(env: DistEnv, device: str, gpus: int | None = None) -> None:
    """DistributedDataParallel on CUDA needs a GPU of its own for each process (NCCL
    refuses two ranks on one device, with an error that does not say what to change)."""
    if not str(device).startswith("cuda"):
        return
    if gpus is None:
        gpus = torch.cuda.device_count()
    if env.local_world_size > gpus:
        raise UsageError(
            f"torchrun started {env.local_world_size} processes on this machine, which has "
            f"{gpus} GPU{'s' if gpus != 1 else ''}: training on GPUs needs one GPU per "
            f"process; use --nproc-per-node {max(gpus, 1)}, or --device cpu"
        )


class Dist:
    """This process's part in a torchrun fit."""

    def __init__(self, env: DistEnv, group: ProcessGroup):
        self.env = env
        self.group = group
        self.rank = env.rank
        self.world = env.world_size
        self.main = env.rank == 0

    # ------------------------------------------------------------------ splitting

    def shard(self, total: int, batch_size: int) -> tuple[int, int]:
        """[start, stop) of this rank's whole batches of a list of `total` items."""
        return Shard(self.rank, self.world).range(total, batch_size)

    def mine(self, rows: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous slice of a global batch (earlier ranks take the extra
        rows of a batch that does not split evenly; a slice may be empty)."""
        base, extra = divmod(len(rows), self.world)
        start = self.rank * base + min(self.rank, extra)
        return rows[start : start + base + (1 if self.rank < extra else 0)]

    def seed(self, seed: int) -> int:
        """A per-rank seed derived from the shared one (rank 0 keeps it)."""
        return (seed + self.rank * 1_000_033) % (2**31 - 1)

    # ------------------------------------------------------------------ status

    def check(self, own: BaseException | None, payload=None, agree=None) -> list:
        """Exchange statuses (a barrier): if any rank failed, every rank raises (its own
        error, else the lowest failing rank's). `agree`: a JSON value every rank must
        share with rank 0. Returns every rank's `payload`, in rank order."""
        msgs = self.group.all_gather_json(
            {"status": status_of(own), "payload": payload, "agree": agree}
        )
        raise_first_failure([m["status"] for m in msgs], self.rank, own)
        for r, m in enumerate(msgs):
            if m["agree"] != msgs[0]["agree"]:
                raise DataError(
                    f"rank {r} sees other training data or another checkpoint than rank 0; "
                    "with several machines the images and the model directory must be at "
                    "the same paths on a filesystem every node shares"
                )
        return [m["payload"] for m in msgs]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """fn() on rank 0 (the writes), then a status exchange."""
        own, result = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                own = e
        self.check(own)
        return result

    # ------------------------------------------------------------------ numbers

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on CPU)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's JSON value, in rank order, on every rank."""
        return self.group.all_gather_json(obj)

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over ranks (in place)."""
        for t in tensors:
            tdist.all_reduce(t)
            t.div_(self.world)

    # ------------------------------------------------------------------ caches

    def share_rows(self, counts: Sequence[int], local: torch.Tensor | None, dest) -> None:
        """Fill `dest` (a tensor or a numpy memmap) with every rank's rows in rank order:
        rank r contributes counts[r] rows; `local` holds this rank's."""
        row_shape = tuple(dest.shape[1:])
        dtype = _torch_dtype(dest)
        row_bytes = max(1, int(np.prod(row_shape)) * torch.empty((), dtype=dtype).element_size())
        chunk = max(1, CHUNK_BYTES // row_bytes)
        offset = 0
        for r, n in enumerate(counts):
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                if r == self.rank:
                    buf = local[a:b].contiguous()
                else:
                    buf = torch.empty((b - a, *row_shape), dtype=dtype)
                tdist.broadcast(buf.reshape(b - a, -1).view(torch.uint8), src=r)
                if isinstance(dest, np.ndarray):
                    dest[offset + a : offset + b] = buf.numpy()
                else:
                    dest[offset + a : offset + b] = buf
            offset += n


def write_once(dist: Dist | None, fn: Callable[[], T]) -> T | None:
    """fn() writes files: in one process just call it; under torchrun rank 0 calls it
    and every rank waits for its status (an error fails every rank)."""
    if dist is None:
        return fn()
    return dist.on_main(fn)


def _torch_dtype(dest) -> torch.dtype:
    if isinstance(dest, np.ndarray):
        return torch.from_numpy(np.empty(0, dtype=dest.dtype)).dtype
    return dest.dtype
