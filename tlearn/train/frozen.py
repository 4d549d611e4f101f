"""Caches of what the frozen part of the network computes, per readable image: pooled
features or a frozen prefix's maps, in memory or memory-mapped on disk. Built once before
the first epoch (training images: in modes features and prefix; validation images:
whenever a frozen part exists); under torchrun each rank computes its shard."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tlearn.cache.store import FeatureStore, cache_root, hash_files
from tlearn.core.errors import DataError
from tlearn.core.options import RunOptions
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.features.engine import CutRequest, Engine, open_engine
from tlearn.runtime.loader import image_loader
from tlearn.runtime.transforms import eval_transform
from tlearn.train.build import Setup


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


def _memmap(disk_dir: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """A new .npy file in disk_dir for `shape` rows of float16 or float32."""
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    return np.lib.format.open_memmap(
        disk_dir / f"{name}.npy", mode="w+", dtype=np_dtype, shape=shape
    )


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
    disk_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    autocast=None,
    allow_empty: bool = False,
    store: FeatureStore | None = None,
) -> tuple[TensorCache, None]:
    """fn(images) for every readable image (eval preprocessing): a frozen prefix's maps.
    With `store`, maps of images already there (by content) are read from it and the
    others are added, so another run on the same images computes none. `allow_empty`: no
    readable image gives an empty cache (a rank's shard) instead of an error."""
    n = len(paths)
    todo, hits, keys = list(range(n)), [], []
    if store is not None and len(store.known):
        keys = hash_files(paths)
        found = store.hits([k or b"" for k in keys])
        todo = [i for i in range(n) if not found[i]]
        hits = [i for i in range(n) if found[i]]
    rows: dict[int, torch.Tensor] = {}
    done = len(hits)
    if todo:
        loader = image_loader(
            [paths[i] for i in todo],
            eval_transform(data_config),
            batch_size=batch_size,
            workers=workers,
            min_size=resize_target(data_config),
            device=device,
            keyed=store is not None,
        )
        with torch.inference_mode():
            for item in loader:
                batch_idx, x, bad = item[:3]
                skipped.extend(Skipped(str(paths[todo[i]]), r) for i, r in bad)
                if x is not None:
                    with autocast():
                        out = fn(x.to(device, non_blocking=True)).to("cpu", dtype)
                    rows.update((todo[i], out[j]) for j, i in enumerate(batch_idx))
                    if store is not None:
                        store.put(item[3], out.reshape(len(out), -1).numpy())
                done += len(batch_idx) + len(bad)
                if progress is not None:
                    progress(done, n)
    if store is not None:
        store.close()
    if hits:
        shape = _map_shape(fn, rows, data_config, device, autocast)
        cached = torch.from_numpy(store.get([keys[i] for i in hits]).copy())
        rows.update(zip(hits, cached.reshape(len(hits), *shape), strict=True))
        if progress is not None:
            progress(done, n)
    indices = np.asarray(sorted(rows), dtype=np.int64)
    if not len(indices):
        if not allow_empty:
            raise DataError("no readable images to train on")
        return TensorCache(indices, torch.empty(0)), None
    t = torch.stack([rows[i] for i in indices.tolist()])
    if disk_dir is None:
        return TensorCache(indices, t), None
    arr = _memmap(disk_dir, "x", tuple(t.shape), dtype)
    arr[:] = t.numpy()
    arr.flush()
    return TensorCache(indices, arr), None


def _map_shape(fn, rows, data_config: dict, device, autocast) -> tuple[int, ...]:
    """The shape of one image's map: from a computed row, else one zero image."""
    if rows:
        return tuple(next(iter(rows.values())).shape)
    with torch.inference_mode(), autocast():
        return tuple(fn(torch.zeros(1, *data_config["input_size"], device=device)).shape[1:])


def prefix_store(setup: Setup) -> FeatureStore | None:
    """The on-disk cache of the frozen prefix's maps, keyed like features (backbone and
    weights, where the prefix ends, preprocessing, precision): a second run with another
    learning rate reads them instead of running the prefix again."""
    if not setup.run.cache:
        return None
    spec = setup.network.spec
    end = setup.net.prefix_module_names()[-1].removeprefix("model.")
    prefix = replace(spec, layers=(end,), pool="prefix-map")
    precision = "amp" if setup.device.type == "cuda" else "fp32"
    return FeatureStore.open(
        cache_root(),
        prefix,
        setup.network.data_config,
        draft=True,  # image_loader decodes JPEGs at the reduced scale, as extraction does
        precision=f"{precision}-to-fp16",
        dtype="float16",
    )


def engine_cache(
    engine: Engine,
    paths: Sequence[str],
    run: RunOptions,
    *,
    skipped: list[Skipped],
    stage: str,
    flip: bool = False,
    disk_dir: Path | None = None,
    allow_empty: bool = False,
) -> tuple[TensorCache, TensorCache | None]:
    """Pooled features of every readable image (and of the mirror images with `flip`)
    from the feature engine, the one that extract and the SVM use: ONNX Runtime on CPU,
    through the on-disk feature cache, so a second fit on the same images runs no
    backbone."""
    feats = engine.extract(paths, run, stage=stage)
    skipped.extend(feats.skipped)
    mirror = engine.mirrored().extract(paths, run, stage=f"{stage} (mirror)") if flip else None
    if not len(feats.indices):
        if not allow_empty:
            raise DataError("no readable images to train on")
        empty = TensorCache(feats.indices, torch.empty(0))
        return empty, (TensorCache(feats.indices, torch.empty(0)) if flip else None)

    def store(X: np.ndarray, name: str) -> TensorCache:
        if disk_dir is None:
            return TensorCache(feats.indices, torch.from_numpy(X))
        arr = _memmap(disk_dir, name, X.shape, torch.float32)
        arr[:] = X
        arr.flush()
        return TensorCache(feats.indices, arr)

    return store(feats.X, "x"), (store(mirror.X, "x_flip") if mirror is not None else None)


def _sharded_cache(setup: Setup, compute, paths, *, dtype, disk_dir, share: bool, flip: bool):
    """compute(paths, skipped, disk_dir, allow_empty, flip) under torchrun: each rank
    computes its shard of whole batches (the batches of a single run); `share`: then
    every rank gets every rank's rows (the training cache, sampled anew each epoch), else
    it keeps its own shard (validation runs in the same shards)."""
    d = setup.dist
    start, stop = d.shard(len(paths), setup.run.batch_size)
    own, local, skipped, payload = None, (None, None), [], None
    try:
        local = compute(paths[start:stop], skipped, None if share else disk_dir, True, flip)
        x = local[0]
        payload = {
            "skipped": [[sk.path, sk.reason] for sk in skipped],
            "indices": (x.indices + start).tolist(),
            "shape": list(x.data.shape[1:]) if len(x) else None,
        }
    except Exception as e:
        own = e
    infos = d.check(own, payload)
    for info in infos:  # in rank order: input order, as a single run lists them
        setup.skipped += [Skipped(*sk) for sk in info["skipped"]]
    if not share:
        for c in local:
            if c is not None:
                c.indices = c.indices + start
        return local
    indices = np.asarray([i for info in infos for i in info["indices"]], dtype=np.int64)
    if not len(indices):
        raise DataError("no readable images to train on")  # every rank alike
    shape = (len(indices), *next(i["shape"] for i in infos if i["shape"] is not None))
    counts = [len(info["indices"]) for info in infos]

    def shared(c: TensorCache | None, name: str) -> TensorCache:
        if disk_dir is None:
            dest = torch.empty(shape, dtype=dtype)
        else:
            dest = _memmap(disk_dir, name, shape, dtype)
        d.share_rows(counts, None if c is None else c.data, dest)
        if disk_dir is not None:
            dest.flush()
        return TensorCache(indices, dest)

    return shared(local[0], "x"), (shared(local[1], "x_flip") if flip else None)


def cache_rows(setup: Setup, level: str, paths, *, disk_dir, stage, share, flip=False):
    """(cache, cache of the mirrored images or None) of the frozen part's output over
    `paths` (`level`: "features" through the feature engine, "prefix" maps in torch), in
    this process or sharded over the torchrun ranks (see _sharded_cache for `share`)."""
    run, store = setup.run, None
    if level == "features":
        dtype, engine = torch.float32, features_engine(setup)

        def compute(sub, skipped, disk, allow_empty, flip):
            return engine_cache(
                engine,
                sub,
                run,
                skipped=skipped,
                stage=stage,
                flip=flip,
                disk_dir=disk,
                allow_empty=allow_empty,
            )

    else:
        dtype = torch.float16

        store = prefix_store(setup)

        def compute(sub, skipped, disk, allow_empty, flip):  # flip: mirrored maps, per batch
            return compute_cache(
                setup.net.forward_prefix,
                sub,
                setup.network.data_config,
                device=setup.device,
                batch_size=run.batch_size,
                workers=run.workers,
                skipped=skipped,
                dtype=dtype,
                disk_dir=disk,
                progress=run.bar(stage),
                autocast=setup.amp.autocast,
                allow_empty=allow_empty,
                store=store,
            )

    if setup.dist is None:
        caches = compute(paths, setup.skipped, disk_dir, False, flip)
    else:
        caches = _sharded_cache(
            setup, compute, paths, dtype=dtype, disk_dir=disk_dir, share=share, flip=flip
        )
    if level == "prefix" and store is not None:  # what this rank read and computed
        stats = setup.prefix_maps
        stats["cached"] = stats.get("cached", 0) + store.served
        stats["computed"] = stats.get("computed", 0) + store.written
    return caches


def features_engine(setup: Setup) -> Engine:
    """The feature engine on the run's own backbone (opened once per run): the cut, its
    exported graph and the feature cache are those of extract and the SVM heads."""
    if setup.engine is None:
        spec = setup.network.spec
        request = CutRequest(spec.model, layers=list(spec.layers), pool=spec.pool)
        setup.engine = open_engine(request, setup.run, backbone=setup.network.backbone)
    return setup.engine


class Caches:
    """The caches of a run: the training images' (with their mirror images' for exact
    flips of features), and the validation images'. `val_level` says what the validation
    cache holds: "features" or "prefix" maps (None: no validation cache)."""

    def __init__(self):
        self.train: TensorCache | None = None
        self.train_flip: TensorCache | None = None
        self.val: TensorCache | None = None
        self.val_level: str | None = None
        self.train_level: str | None = None  # what self.train holds ("features": the OOD bank)
        self.tmp: Path | None = None  # the --cache disk folder, removed by cleanup()

    def fill(self, setup: Setup) -> None:
        o, net, mode = setup.options, setup.net, setup.mode
        disk = None
        if o.cache == "disk" and mode != "images":
            base = o.cache_dir or None
            if base:
                Path(base).mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix="tlearn-cache-", dir=base))
            disk = self.tmp
        net.eval()
        level = None
        if mode == "features" or (
            mode == "images"
            and not setup.plan.backbone_trains
            and o.bn == "frozen"
            and o.cache != "off"
        ):
            level = "features"
        elif setup.split > 0 and o.cache != "off":
            level = "prefix"
        if mode in ("features", "prefix"):
            self.train_level = level
            self.train, self.train_flip = cache_rows(
                setup,
                level,
                setup.train_set.paths,
                flip=setup.augment == "flip" and mode == "features",
                disk_dir=disk,
                stage="cache train",
                share=True,
            )
        if setup.val_set is not None and len(setup.val_set) and level is not None:
            self.val_level = level
            self.val, _ = cache_rows(
                setup,
                level,
                setup.val_set.paths,
                disk_dir=None,
                stage="cache val",
                share=False,
            )
        if setup.engine is not None:  # e.g. an ONNX export that fell back to torch
            setup.warnings += [n for n in setup.engine.notes if n not in setup.warnings]

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
