"""Decoding images into uint8 pixel batches in worker processes, without torch.

Used for feature extraction on every device (extract; fit, predict and evaluate with
svm/logreg heads): the workers decode (with JPEG draft), hash the bytes they decode (the
feature cache key) and apply tlearn.pixels.PilSteps, and hand whole batches back in input
order while the main process runs the network. At most `prefetch` batches per worker are
in flight, so memory does not grow with the number of images. A run needs no torch for
it (see tlearn.warm), and on a GPU machine it fed the GPU 5x faster than torch's
DataLoader (docs/benchmarks.md). `ordered_map` is the same machinery for any function
(tlearn.features writes CSV text with it).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from tlearn.core.errors import DataError, ImageLoadError
from tlearn.core.hashing import content_key
from tlearn.core.system import die_with_parent
from tlearn.data.image import load_image

# (indices into the path list, pixels (B, H, W, 3) uint8 or None, [(index, reason)],
#  content keys of the decoded images or None)
Batch = tuple[list[int], np.ndarray | None, list[tuple[int, str]], list[bytes] | None]


def decode_one(path: str, transform, min_size: int | None, keyed: bool):
    """(transformed image, None, key) or (None, reason, None); never raises for a bad
    image. With `keyed`, the file's bytes are read once, hashed (the feature cache key) and
    decoded from those very bytes. Also what features.ImageDataset returns per item."""

    content = None
    if keyed:
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                with open(path, "rb") as f:
                    content = f.read()
        except OSError:
            content = None  # load_image words the reason (missing, permission, ...)
    try:
        img = load_image(path, min_size=min_size, content=content)
        pixels = transform(img)
    except ImageLoadError as e:
        return None, e.reason, None
    except Exception as e:  # a transform failing on a strange image: skip, say why
        return None, f"cannot preprocess ({type(e).__name__}: {e})", None
    return pixels, None, (content_key(content) if content is not None else None)


def decode_batch(job) -> Batch:
    start, paths, transform, min_size, keyed = job
    idx, arrays, bad, keys = [], [], [], []
    for j, path in enumerate(paths):
        pixels, reason, key = decode_one(path, transform, min_size, keyed)
        if pixels is None:
            bad.append((start + j, reason))
            continue
        idx.append(start + j)
        arrays.append(pixels)
        keys.append(key)
    x = np.stack(arrays) if arrays else None
    return idx, x, bad, (keys if keyed else None)


def _context():
    # fork starts workers in milliseconds and shares the already imported modules; the
    # workers only run Pillow and numpy. Elsewhere (macOS, Windows) spawn is the safe one.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def decoded_batches(
    paths: Sequence[str],
    transform,
    *,
    batch_size: int,
    workers: int,
    min_size: int | None,
    keyed: bool,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Batches of pixels in input order; with `workers` 0, decoded in this process.
    Batches come back pickled through a pipe: handing them over in shared memory instead
    made no measurable difference (main-process CPU per image 11.55 vs 11.37-11.64 ms,
    docs/benchmarks.md), so the simpler way stays."""
    jobs = (
        (lo, [str(p) for p in paths[lo : lo + batch_size]], transform, min_size, keyed)
        for lo in range(0, len(paths), batch_size)
    )

    def died(job) -> DataError:
        first, last = job[1][0], job[1][-1]
        return DataError(
            f"a decoding worker process died while reading {first} .. {last}; run again "
            "with --workers 0 to decode in the main process and see which image it is"
        )

    yield from ordered_map(decode_batch, jobs, workers, prefetch, died)


def worker_init(parent_pid: int) -> None:
    """Set up a decoding worker: it ends with its parent (even a parent killed with
    SIGKILL, which cannot shut its pool down), and leaves Ctrl-C to the parent."""
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group. The main process stops the run (keeping the
    # partial output for --resume) and shuts the pool down; a worker would only print a
    # traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_map(fn, jobs: Iterator, workers: int, prefetch: int, died) -> Iterator:
    """fn(job) for each job, computed in `workers` processes (in this one with 0),
    results in job order. At most workers x prefetch jobs are in flight, so memory stays
    bounded; `jobs` is only advanced as results are taken (it may itself be doing work,
    e.g. extraction). A worker that dies raises died(job) for the job it was on."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    in_flight = workers * prefetch
    pool = worker_pool(workers)
    try:
        pending: deque = deque()

        def submit():
            while len(pending) < in_flight:
                job = next(jobs, None)
                if job is None:
                    return
                pending.append((job, pool.submit(fn, job)))

        submit()
        while pending:
            job, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                raise died(job) from None
            yield result
            submit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes, all started before this returns: forking later
    would copy a process that by then runs ONNX Runtime / CUDA threads. Ctrl-C is left to
    the main process; workers end with their parent. ProcessPoolExecutor, not
    multiprocessing.Pool: a worker that dies (a crash inside a decoder, the OOM killer)
    fails the pending jobs instead of hanging."""
    pool = ProcessPoolExecutor(
        workers, mp_context=_context(), initializer=worker_init, initargs=(os.getpid(),)
    )
    try:
        for f in [pool.submit(os.getpid) for _ in range(workers)]:
            f.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


def default_workers(n_images: int, batch_size: int, device_type: str = "cpu") -> int:
    """Decode in worker processes so decoding overlaps the forward pass; on small machines
    one worker leaves the other cores to torch. A GPU computes by itself: then all cores
    but the one feeding it decode."""
    if n_images <= batch_size:
        return 0
    cores = os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, min(8, cores - 1))
    return max(1, min(4, cores // 2))
