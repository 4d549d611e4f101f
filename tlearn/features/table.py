"""Feature tables on disk: the CSV `tlearn extract` writes (path, label, f0..fN; float32
as the shortest text that reads back exactly) with its sidecar JSON, written through a
`.partial` file that --resume continues, and read back for fit, predict and merge."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlearn.core.atomic import check_output_parent, read_json, write_json
from tlearn.core.errors import DataError
from tlearn.core.system import cpu_cores, dist_version
from tlearn.core.version import __version__
from tlearn.data.decode import ordered_map
from tlearn.features.stream import FeatureBatch

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
    check_output_parent(out)
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

    def died(job) -> DataError:
        return DataError(f"a CSV-writing worker process died near {job[0][0]}; run again")

    yield from ordered_map(csv_text, jobs, csv_workers(), 2, died)


def sidecar_path(csv_path: str | Path) -> Path:
    return Path(f"{csv_path}.json")


def feature_meta(spec, data_config: dict, dim: int) -> dict:

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
    # pandas costs ~0.5 s to import: only reading a table needs it
    import pandas as pd

    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(
            f"{path} has no sidecar {side.name}; features CSVs must come from `tlearn extract` "
            "(the sidecar records the backbone, layer and preprocessing)"
        )
    meta = read_json(side, DataError)
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
