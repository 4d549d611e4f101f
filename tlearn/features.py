"""Feature extraction: decode images in worker processes, run the cut network, pool,
and stream (paths, vectors) batches to memory or to a CSV file.

A skipped image is never replaced by another sample: each batch carries the indices
of the images it actually holds, and unreadable ones are reported separately.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.atomic import write_json
from tlearn.core.errors import DataError
from tlearn.core.version import __version__
from tlearn.data.decode import default_workers
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.runtime.device import resolve_device
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
    net,
    paths: Sequence[str],
    data_config: dict,
    *,
    batch_size: int = 32,
    device: str = "auto",
    workers: int | None = None,
    skipped: list[Skipped] | None = None,
    progress: Progress | None = None,
    runtime=None,
    cache=None,
    draft: bool = True,
) -> Iterator[FeatureBatch]:
    """Yield feature batches in input order; unreadable images go to `skipped`.

    `runtime`: a callable (batch tensor -> (B, D) numpy) with a `.device`, from
    tlearn.runtime; default: `net` in torch on `device`. When it has a `transform`, the
    workers apply that one (uint8 pixels) instead of the eval transform. `cache`: a
    tlearn.cache.FeatureStore; cached images are read from it (and not decoded), new
    features written to it. `draft`: let JPEGs decode at a reduced scale (see
    data.load_image)."""
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    if runtime is None:
        from tlearn.runtime.torch_runtime import TorchRuntime

        runtime = TorchRuntime(net, resolve_device(device))
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

        keys = hash_files(paths)
        found = cache.known.positions([k or b"" for k in keys]) >= 0
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
        )
        for sub_idx, feats, bad in batches:
            for j, reason in bad:
                if skipped is not None:
                    skipped.append(Skipped(str(paths[todo[j]]), reason))
            idx = [todo[j] for j in sub_idx]
            last = max([*idx, *(todo[j] for j, _ in bad)])
            # cached images before this batch, in whole batches first
            while len(hits) - h >= batch_size and hits[h + batch_size - 1] < last:
                yield _cached_batch(cache, hits[h : h + batch_size], hit_keys, h)
                done, h = done + batch_size, h + batch_size
                _report(progress, done, n)
            k = h
            while k < len(hits) and hits[k] < last:
                k += 1
            if k > h:  # merge the remaining few into this batch, in input order
                cached = _cached_batch(cache, hits[h:k], hit_keys, h)
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
            yield _cached_batch(cache, chunk, hit_keys, h)
            done, h = done + len(chunk), h + len(chunk)
            _report(progress, done, n)
    finally:
        if cache is not None:
            cache.close()


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _cached_batch(cache, indices: list[int], hit_keys: list[bytes], start: int) -> FeatureBatch:
    keys = hit_keys[start : start + len(indices)]
    return FeatureBatch(indices=list(indices), features=cache.get(keys))


def _computed_batches(runtime, paths, data_config, *, batch_size, workers, cache, draft):
    """(indices into `paths`, features or None, [(index, reason)]) per decoded batch, in
    order; new features go to the cache."""
    if not paths:
        return
    dev = runtime.device
    min_size = resize_target(data_config) if draft else None
    # A runtime may take uint8 pixels and normalise them itself (tlearn.runtime).
    transform = getattr(runtime, "transform", None) or eval_transform(data_config)
    n_workers = default_workers(len(paths), batch_size, dev.type) if workers is None else workers
    from tlearn.data.pixels import PilSteps

    if isinstance(transform, PilSteps):
        # uint8 pixel batches from plain worker processes: no torch needed (tlearn.decode).
        # On CUDA too: on a 16-core H200 machine torch's DataLoader (8 workers, pinned)
        # fed the GPU 375 img/s, this pool 1,880 (docs/benchmarks.md, GPU section).
        from tlearn.data.decode import decoded_batches

        loader = decoded_batches(
            paths,
            transform,
            batch_size=batch_size,
            workers=n_workers,
            min_size=min_size,
            keyed=cache is not None,
        )
    else:
        loader = torch_batches(paths, transform, min_size, batch_size, n_workers, cache, dev)
    for idx, x, bad, keys in loader:
        feats = runtime(x) if x is not None else None
        if cache is not None and feats is not None:
            known = [k is not None for k in keys]
            if all(known):
                cache.put(keys, feats)
            elif any(known):
                sel = np.nonzero(known)[0]
                cache.put([keys[j] for j in sel], feats[sel])
        yield idx, feats, bad


def extract_array(net, paths: Sequence[str], data_config: dict, **kwargs) -> Features:
    skipped: list[Skipped] = []
    idx: list[int] = []
    parts: list[np.ndarray] = []
    for b in iter_features(net, paths, data_config, skipped=skipped, **kwargs):
        idx.extend(b.indices)
        parts.append(b.features)
    X = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return Features(indices=np.asarray(idx, dtype=np.int64), X=X, skipped=skipped)


# ----------------------------------------------------------------------------- CSV


def feature_columns(dim: int) -> list[str]:
    return [f"f{i}" for i in range(dim)]


def write_features_csv(
    batches: Iterator[FeatureBatch],
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out: str | Path,
    meta: dict,
    *,
    resume: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> int:
    """Stream batches to CSV `out`, or to stdout when out is "-". Returns rows written.

    A file is written as `<out>.partial` (flushed batch by batch) and renamed into place
    only when complete, so a killed run never leaves a half-written `out`; with `resume`
    the rows already in the partial file are kept and `batches` must hold the rest.
    `before_commit` runs just before the rename and may raise to abandon the output.
    Writes the sidecar `<out>.json` with `meta`.
    """
    if str(out) == "-":
        return _write_rows(sys.stdout, batches, paths, labels, meta, header=True)
    out = Path(out)
    partial = partial_path(out)
    kept = len(partial_rows(out, meta)) if resume else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(f"{partial}.json"), meta)
    try:
        with open(partial, "a" if kept else "w", newline="", encoding="utf-8") as f:
            rows = _write_rows(f, batches, paths, labels, meta, header=not kept, flush=True)
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
    except BaseException as e:
        # Interrupted: keep the partial file for --resume. Abandoned on purpose: remove it.
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            discard_partial(out)
        raise
    os.replace(partial, out)
    write_json(sidecar_path(out), {**meta, "rows": kept + rows})
    Path(f"{partial}.json").unlink(missing_ok=True)
    return kept + rows


def partial_path(out: str | Path) -> Path:
    return Path(f"{out}.partial")


def discard_partial(out: str | Path) -> None:
    partial = partial_path(out)
    partial.unlink(missing_ok=True)
    Path(f"{partial}.json").unlink(missing_ok=True)


def partial_rows(out: str | Path, meta: dict) -> list[str]:
    """Paths already written to `<out>.partial` by an interrupted run, after cutting off a
    last row that was only half written. Checks the partial run used the same cut."""
    partial = partial_path(out)
    if not partial.is_file():
        return []
    side = Path(f"{partial}.json")
    try:
        old = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if (
        old is None
        or old.get("cut") != meta.get("cut")
        or old.get("data_config") != meta.get("data_config")
    ):
        raise DataError(
            f"{partial} was written with another model, layer, pool or preprocessing; "
            "run without --resume to start over"
        )
    ncols = 2 + int(meta["feature_dim"])
    data = partial.read_bytes()
    good_end, done = 0, []
    reader_input = io.StringIO(data.decode("utf-8", errors="replace"), newline="")
    # Walk complete lines; csv handles quoted paths. Stop at the first damaged row.
    offset = 0
    for line in reader_input:
        offset += len(line.encode("utf-8"))
        if not line.endswith("\n"):
            break
        row = next(csv.reader([line]), [])
        if not row:
            break
        if row[0] == "path" and good_end == 0:
            if len(row) != ncols:
                break
            good_end = offset
            continue
        if len(row) != ncols:
            break
        done.append(row[0])
        good_end = offset
    with open(partial, "r+b") as f:
        f.truncate(good_end)
    return done


def _write_rows(out, batches, paths, labels, meta, header: bool, flush: bool = False) -> int:
    if header:
        dim = int(meta.get("feature_dim", 0))
        csv.writer(out).writerow(["path", "label", *feature_columns(dim)])
    rows = 0
    for text, n in _csv_texts(batches, paths, labels):
        out.write(text)
        rows += n
        if flush:
            out.flush()  # a killed run keeps every finished batch for --resume
    return rows


def csv_text(job) -> tuple[str, int]:
    """(CSV lines, rows) of one batch: path, label, then each float32 as the shortest
    string that reads back to the same float32 (numpy's repr)."""
    paths, labels, features = job
    buf = io.StringIO()
    writer = csv.writer(buf)
    for path, label, row in zip(paths, labels, features.astype(str), strict=True):
        writer.writerow([path, "" if label is None else label, *row])
    return buf.getvalue(), len(paths)


def csv_workers(cores: int | None = None) -> int:
    """Processes that turn features into CSV text (~1,000 rows of 1,280 features a second
    each): none on small machines, where every core already decodes or computes; on a
    16-core GPU machine the text written in the main process capped extraction at that
    rate (docs/benchmarks.md, GPU section)."""
    from tlearn.core.system import cpu_cores

    cores = cpu_cores() if cores is None else cores
    return 0 if cores < 8 else min(4, cores // 4)


def _csv_texts(batches, paths, labels):
    """(CSV text, rows) per batch, in order; formatted in worker processes while the next
    batches are extracted, when the machine has cores to spare (csv_workers)."""
    jobs = (
        (
            [str(paths[i]) for i in b.indices],
            [labels[i] if labels is not None else None for i in b.indices],
            b.features,
        )
        for b in batches
    )
    from tlearn.data.decode import ordered_map

    def died(job) -> DataError:
        return DataError(f"a CSV-writing worker process died near {job[0][0]}; run again")

    yield from ordered_map(csv_text, jobs, csv_workers(), 2, died)


def sidecar_path(csv_path: str | Path) -> Path:
    return Path(f"{csv_path}.json")


def feature_meta(spec, data_config: dict, dim: int) -> dict:
    from tlearn.core.system import dist_version

    return {
        "format": "tlearn-features",
        "format_version": 1,
        "cut": spec.to_dict(),
        "data_config": data_config,
        "feature_dim": dim,
        "versions": {
            "tlearn": __version__,
            "timm": dist_version("timm"),
            "torch": dist_version("torch"),
        },
    }


@dataclass
class FeatureTable:
    paths: list[str]
    labels: list[str | None]
    X: np.ndarray
    meta: dict


def read_features_csv(path: str | Path) -> FeatureTable:
    """Read a CSV written by `tlearn extract` (and its sidecar JSON)."""
    import pandas as pd

    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(
            f"{path} has no sidecar {side.name}; features CSVs must come from `tlearn extract` "
            "(the sidecar records the backbone, layer and preprocessing)"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{side}: not valid JSON ({e})") from None
    if meta.get("format") != "tlearn-features":
        raise DataError(f"{side}: not a tlearn features sidecar (format={meta.get('format')!r})")
    try:
        df = pd.read_csv(path, dtype={"path": str, "label": str}, keep_default_na=False)
    except Exception as e:
        raise DataError(f"cannot read features CSV {path}: {e}") from None
    cols = list(df.columns)
    if cols[:2] != ["path", "label"] or any(not c.startswith("f") for c in cols[2:]):
        raise DataError(f"{path}: header must be path,label,f0..fN (got {','.join(cols[:4])}...)")
    if len(cols) - 2 != int(meta.get("feature_dim", len(cols) - 2)):
        raise DataError(
            f"{path}: {len(cols) - 2} feature columns but the sidecar says "
            f"{meta.get('feature_dim')}"
        )
    try:
        X = df.iloc[:, 2:].to_numpy(dtype=np.float32)
    except ValueError as e:
        raise DataError(f"{path}: non-numeric feature value ({e})") from None
    labels = [lab if lab != "" else None for lab in df["label"].tolist()]
    return FeatureTable(paths=df["path"].tolist(), labels=labels, X=X, meta=meta)


def is_features_csv(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".csv" and sidecar_path(p).is_file()
