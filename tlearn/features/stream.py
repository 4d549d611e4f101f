"""Feature extraction: decode images in worker processes, run the cut network (any
runtime), and stream (indices, vectors) batches in input order through the feature cache.

A skipped image is never replaced by another sample: each batch carries the indices
of the images it actually holds, and unreadable ones are reported separately.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from tlearn.core.errors import DataError
from tlearn.core.stages import CACHE_READ, CACHE_WRITE, DECODE, Stages, timed
from tlearn.data.decode import default_workers
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import PilSteps, resize_target
from tlearn.runtime.loader import torch_batches
from tlearn.runtime.transforms import eval_transform

Progress = Callable[[int, int], None]  # (images done, images total)


@dataclass
class FeatureBatch:
    indices: list[int]  # positions in the input list
    features: np.ndarray  # (len(indices), D) float32


@dataclass
class Features:
    """Features of the images that could be read, in input order."""

    indices: np.ndarray  # positions in the input list
    X: np.ndarray  # (n, D) float32
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a backend fallback


def iter_features(
    runtime,
    paths: Sequence[str],
    data_config: dict,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    skipped: list[Skipped] | None = None,
    progress: Progress | None = None,
    cache=None,
    draft: bool = True,
    decoder: str = "cpu",
    stages: Stages | None = None,
) -> Iterator[FeatureBatch]:
    """Yield feature batches in input order; unreadable images go to `skipped`.

    `runtime`: a callable (batch -> (B, ...) numpy) with a `.device` (tlearn.runtime, or
    an Engine's runtime). When it has a `transform`, the workers apply that one (uint8
    pixels) instead of the eval transform. `cache`: a tlearn.cache.store.FeatureStore;
    cached images are read from it (and not decoded), new features written to it.
    `draft`: let JPEGs decode at a reduced scale (see data.image.load_image).
    `decoder`: "cpu" (worker processes) or "gpu" (JPEGs decoded on the runtime's CUDA
    device, tlearn.runtime.gpu_decode). `stages`: where the time goes (core.stages)."""
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    n = len(paths)
    todo = list(range(n))  # what the decoding workers get
    hits: list[int] = []  # known from the pre-pass to be cached
    hit_keys: list[bytes] = []
    if cache is not None and len(cache.known):
        # The cache has this cut already: hash every file first (threads; cheap next to
        # decoding) so cached images never reach the workers, and a fully cached run starts
        # none. A cold cut skips this, so each file is read once. Workers hash the bytes they
        # decode again: features are always stored under the key of what was decoded.
        from tlearn.cache.store import hash_files

        with timed(stages, CACHE_READ):
            keys = hash_files(paths)
            found = cache.hits([k or b"" for k in keys])
        todo = [i for i in range(n) if not found[i]]
        hits = [i for i in range(n) if found[i]]
        hit_keys = [keys[i] for i in hits]
    done = 0
    h = 0  # next entry of `hits` to emit
    try:
        batches = _computed_batches(
            runtime,
            [paths[i] for i in todo],
            data_config,
            batch_size=batch_size,
            workers=workers,
            cache=cache,
            draft=draft,
            decoder=decoder,
            stages=stages,
        )
        for sub_idx, feats, bad in batches:
            for j, reason in bad:
                if skipped is not None:
                    skipped.append(Skipped(str(paths[todo[j]]), reason))
            idx = [todo[j] for j in sub_idx]
            last = max([*idx, *(todo[j] for j, _ in bad)])
            # cached images before this batch, in whole batches first
            while len(hits) - h >= batch_size and hits[h + batch_size - 1] < last:
                yield _cached_batch(cache, hits[h : h + batch_size], hit_keys, h, stages)
                done, h = done + batch_size, h + batch_size
                _report(progress, done, n)
            k = h
            while k < len(hits) and hits[k] < last:
                k += 1
            if k > h:  # merge the remaining few into this batch, in input order
                cached = _cached_batch(cache, hits[h:k], hit_keys, h, stages)
                done, h = done + (k - h), k
                if feats is None:
                    idx, feats = cached.indices, cached.features
                else:
                    all_idx = np.asarray(idx + cached.indices)
                    order = np.argsort(all_idx, kind="stable")
                    idx = all_idx[order].tolist()
                    feats = np.concatenate([feats, cached.features])[order]
            if feats is not None:
                yield FeatureBatch(indices=list(idx), features=feats)
            done += len(sub_idx) + len(bad)
            _report(progress, done, n)
        while h < len(hits):
            chunk = hits[h : h + batch_size]
            yield _cached_batch(cache, chunk, hit_keys, h, stages)
            done, h = done + len(chunk), h + len(chunk)
            _report(progress, done, n)
    finally:
        if cache is not None:
            cache.close()


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _cached_batch(cache, indices: list[int], hit_keys, start: int, stages=None) -> FeatureBatch:
    keys = hit_keys[start : start + len(indices)]
    with timed(stages, CACHE_READ):
        return FeatureBatch(indices=list(indices), features=cache.get(keys))


def _computed_batches(
    runtime, paths, data_config, *, batch_size, workers, cache, draft, decoder="cpu", stages=None
):
    """(indices into `paths`, features or None, [(index, reason)]) per decoded batch, in
    order; new features go to the cache."""
    if not paths:
        return
    dev = runtime.device
    min_size = resize_target(data_config) if draft else None
    # A runtime may take uint8 pixels and normalise them itself (tlearn.runtime).
    transform = getattr(runtime, "transform", None) or eval_transform(data_config)
    n_workers = default_workers(len(paths), batch_size, dev.type) if workers is None else workers

    if decoder == "gpu":
        # torch and torchvision: a GPU run has loaded them already
        from tlearn.runtime.gpu_decode import gpu_batches

        loader = gpu_batches(
            paths,
            transform,
            dev,
            batch_size=batch_size,
            min_size=min_size,
            keyed=cache is not None,
            stages=stages,
        )
    elif isinstance(transform, PilSteps):
        # uint8 pixel batches from plain worker processes: no torch needed (tlearn.decode).
        # On CUDA too: on a 16-core H200 machine torch's DataLoader (8 workers, pinned)
        # fed the GPU 375 img/s, this pool 1,880 (docs/benchmarks.md, GPU section).
        from tlearn.data.decode import decoded_batches

        loader = _waited(
            decoded_batches(
                paths,
                transform,
                batch_size=batch_size,
                workers=n_workers,
                min_size=min_size,
                keyed=cache is not None,
            ),
            stages,
        )
    else:
        loader = torch_batches(paths, transform, min_size, batch_size, n_workers, cache, dev)
        loader = _waited(loader, stages)
    for idx, feats, bad, keys in _forward(runtime, loader):
        if cache is not None and feats is not None:
            with timed(stages, CACHE_WRITE):
                known = [k is not None for k in keys]
                if all(known):
                    cache.put(keys, feats)
                elif any(known):
                    sel = np.nonzero(known)[0]
                    cache.put([keys[j] for j in sel], feats[sel])
        yield idx, feats, bad


def _waited(loader, stages: Stages | None):
    """`loader`'s items, the time spent waiting for each added to the decode stage."""
    if stages is None:
        yield from loader
        return
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        stages.add(DECODE, time.perf_counter() - t0)
        if item is None:
            return
        yield item


def _forward(runtime, loader):
    """(indices, features, bad, keys) per batch, in order. A runtime with `submit` (see
    runtime.ort.LazyRuntime) may hold `in_flight` batches on its device at once: the next
    batch is queued before the features of the oldest are waited for. On the CPU that is
    one batch: computed as it is submitted."""
    submit = getattr(runtime, "submit", None)
    if submit is None:  # a plain callable
        for idx, x, bad, keys in loader:
            yield idx, (runtime(x) if x is not None else None), bad, keys
        return
    pending: deque = deque()
    for idx, x, bad, keys in loader:
        pending.append((idx, submit(x) if x is not None else None, bad, keys))
        while len(pending) >= max(1, getattr(runtime, "in_flight", 1)):
            yield _result(pending.popleft())
    while pending:
        yield _result(pending.popleft())


def _result(item):
    idx, job, bad, keys = item
    return idx, (job.result() if job is not None else None), bad, keys


def extract_array(runtime, paths: Sequence[str], data_config: dict, **kwargs) -> Features:
    """iter_features gathered into one array (Features), skipped images listed."""
    skipped: list[Skipped] = []
    idx: list[int] = []
    parts: list[np.ndarray] = []
    for b in iter_features(runtime, paths, data_config, skipped=skipped, **kwargs):
        idx.extend(b.indices)
        parts.append(b.features)
    X = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return Features(indices=np.asarray(idx, dtype=np.int64), X=X, skipped=skipped)
