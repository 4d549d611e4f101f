"""Feature tables on disk, one interface for every format: `tlearn extract -o` writes
CSV (the default), Parquet (.parquet, .pq) or NPY (.npy), chosen by the extension, with a
sidecar OUTPUT.json (backbone, layer, pool, preprocessing) that binds its table: it
records the table's format, rows, size and sha256 as written, and every reader (fit,
predict, evaluate, merge) refuses a table that does not match its sidecar. Callers never
branch on the format; the formats live in tlearn.features.formats.

A table is written as OUTPUT.partial (and, for binary formats, a journal beside it),
flushed batch by batch, and renamed into place only when complete, so a killed run never
leaves a half-written OUTPUT; with --resume the complete rows of the partial file are
kept (OUTPUT.partial.json records the cut and the input list they belong to)."""

from __future__ import annotations

import hashlib
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.atomic import exclusive_lock, read_json, write_json
from tlearn.core.errors import DataError, OutputError, UsageError
from tlearn.core.stages import OUTPUT, OUTPUT_BACKGROUND, Stages, timed
from tlearn.core.system import cpu_cores, dist_version
from tlearn.core.version import __version__
from tlearn.features.formats.common import Digest, Row, RowWriter, TableFormat
from tlearn.features.formats.csv_format import CsvFormat, header_text, stdout_writer
from tlearn.features.formats.npy_format import NpyFormat
from tlearn.features.formats.parquet_format import ParquetFormat
from tlearn.features.stream import FeatureBatch

FORMATS: tuple[TableFormat, ...] = (CsvFormat(), ParquetFormat(), NpyFormat())
_BY_SUFFIX = {s: f for f in FORMATS for s in f.suffixes}
_BY_NAME = {f.name: f for f in FORMATS}
TABLE_SUFFIXES = tuple(_BY_SUFFIX)
OLDER_TLEARN = "written by an older tlearn: not verified"


def table_format(path: str | Path) -> TableFormat:
    """The format of a table file by its extension: .parquet/.pq, .npy, else CSV."""
    return _BY_SUFFIX.get(Path(str(path)).suffix.lower(), FORMATS[0])


def format_named(name: str) -> TableFormat:
    if name not in _BY_NAME:
        raise DataError(f"unknown features table format {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def is_features_table(path: str | Path) -> bool:
    """A file with a table's extension: reading it checks its sidecar."""
    p = Path(path)
    return p.suffix.lower() in _BY_SUFFIX and p.is_file()


def sidecar_path(table: str | Path) -> Path:
    return Path(f"{table}.json")


def partial_path(out: str | Path) -> Path:
    return Path(f"{out}.partial")


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


SIDECAR_ONLY = ("rows", "table", "paths", "labels")


def sidecar_meta(meta: dict, digest: Digest, fmt: TableFormat) -> dict:
    """The sidecar of a finished table: the run's metadata, then its rows and the table's
    identity (and, for .npy, the paths and labels)."""
    side = {k: v for k, v in meta.items() if k not in SIDECAR_ONLY}
    side["rows"] = digest.rows
    side["table"] = {
        "format": fmt.name,
        "rows": digest.rows,
        "bytes": digest.bytes,
        "sha256": digest.sha256,
    }
    side.update(digest.extra)
    return side


# ----------------------------------------------------------------------------- resume


def discard_partial(out: str | Path, fmt: TableFormat | None = None) -> None:
    partial = partial_path(out)
    for f in (fmt or table_format(out)).partial_files(partial):
        f.unlink(missing_ok=True)
    Path(f"{partial}.json").unlink(missing_ok=True)


def kept_rows(
    out: str | Path, meta: dict, *, fmt: TableFormat | None = None, inputs_sha256: str | None = None
) -> list[Row]:
    """(path, label) of the rows an interrupted run left in OUTPUT.partial, after cutting
    off a last row that was only half written. Refuses a partial file of another cut,
    preprocessing or input list."""
    fmt = fmt or table_format(out)
    partial = partial_path(out)
    if not partial.is_file():
        return []
    try:
        old = read_json(Path(f"{partial}.json"), DataError)
    except DataError:
        old = None
    if (
        not isinstance(old, dict)
        or old.get("cut") != meta.get("cut")
        or old.get("data_config") != meta.get("data_config")
        or old.get("feature_dim") != meta.get("feature_dim")
    ):
        raise DataError(
            f"{partial} was written with another model, layer, pool or preprocessing; "
            "run without --resume to start over"
        )
    recorded = old.get("inputs_sha256") or (old.get("shard") or {}).get("inputs_sha256")
    if inputs_sha256 is not None and recorded is not None and recorded != inputs_sha256:
        raise DataError(
            f"{partial} was written for another list of inputs (other images, labels or "
            "order); run without --resume to start over"
        )
    return fmt.recover(partial, int(meta["feature_dim"]))


# ----------------------------------------------------------------------------- writing


class BackgroundWriter(RowWriter):
    """A RowWriter run by a thread, so formatting and writing rows overlap extraction
    (file writes, pyarrow and numpy release the GIL). At most `depth` batches wait."""

    def __init__(self, writer: RowWriter, stages: Stages | None, depth: int = 4):
        self.writer = writer
        self.stages = stages
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tlearn-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises it
            try:
                with timed(self.stages, OUTPUT_BACKGROUND):
                    self.writer.write(*job)
            except BaseException as e:
                self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def rows(self) -> int:
        return self.writer.rows

    def write(self, paths, labels, X) -> None:
        self._check()
        self.queue.put((paths, labels, X))

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def finish(self, out: Path) -> Digest:
        self._stop()
        self._check()
        with timed(self.stages, OUTPUT_BACKGROUND):
            return self.writer.finish(out)

    def close(self) -> None:
        self._stop()
        self.writer.close()


def background_writes(fmt: TableFormat, cores: int | None = None) -> bool:
    """Binary tables are written by a thread on machines with cores to spare (8 or more,
    where a GPU may outrun one core formatting rows); on small ones every core already
    decodes or computes, and writing in the main thread costs nothing extra."""
    cores = cpu_cores() if cores is None else cores
    return fmt.name != "csv" and cores >= 8


def _rows_of(b: FeatureBatch, paths, labels) -> tuple[list[str], list, np.ndarray]:
    return (
        [str(paths[i]) for i in b.indices],
        [labels[i] if labels is not None else None for i in b.indices],
        b.features,
    )


def write_table(
    batches: Iterator[FeatureBatch],
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out: str | Path,
    meta: dict,
    *,
    fmt: TableFormat | None = None,
    kept: Sequence[Row] = (),
    expected: int = 0,
    inputs_sha256: str | None = None,
    before_commit: Callable[[], None] | None = None,
    stages: Stages | None = None,
) -> int:
    """Stream batches to the table `out` (format: `fmt`, else by extension), or as CSV to
    stdout when out is "-". Returns the rows of the table.

    `kept`: rows an interrupted run left in the partial file (kept_rows); `batches` must
    hold the rest. `expected`: the rows this call will likely add. `before_commit` runs
    just before the rename and may raise to abandon the output. Writes the sidecar."""
    if str(out) == "-":
        return _write_stdout(batches, paths, labels, meta)
    out = Path(out)
    fmt = fmt or table_format(out)
    partial = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(f"{partial}.lock"), str(out)):  # one writer per -o at a time
        return _write_file(
            batches,
            paths,
            labels,
            out,
            meta,
            fmt,
            kept,
            expected,
            inputs_sha256,
            before_commit,
            stages,
        )


def _write_file(
    batches,
    paths,
    labels,
    out: Path,
    meta,
    fmt,
    kept,
    expected,
    inputs_sha256,
    before_commit,
    stages,
) -> int:
    partial = partial_path(out)
    write_json(Path(f"{partial}.json"), {**meta, "inputs_sha256": inputs_sha256})
    kept = list(kept)
    writer = fmt.open(partial, meta, kept, len(kept) + expected)
    if background_writes(fmt):
        writer = BackgroundWriter(writer, stages)
    try:
        for b in batches:
            t0 = time.perf_counter()
            writer.write(*_rows_of(b, paths, labels))
            if stages is not None:
                stages.add(OUTPUT, time.perf_counter() - t0)
        if before_commit is not None:
            before_commit()
        with timed(stages, OUTPUT):
            digest = writer.finish(out)
    except OSError as e:  # a full disk, a quota, a lost mount: keep the rows for --resume
        writer.close()
        raise OutputError(
            f"could not write {partial} ({e.strerror or e}); the {writer.rows} rows written "
            "so far are kept there: free space (or fix the folder) and rerun the same "
            "command with --resume"
        ) from None
    except BaseException as e:
        writer.close()
        # Interrupted: keep the partial file for --resume. Abandoned on purpose: remove it.
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            discard_partial(out, fmt)
        raise
    write_json(sidecar_path(out), sidecar_meta(meta, digest, fmt))
    Path(f"{partial}.json").unlink(missing_ok=True)
    return digest.rows


def _write_stdout(batches, paths, labels, meta) -> int:
    """CSV on stdout; the header comes with the first row, so a run that reads no image
    at all writes nothing there."""
    writer = stdout_writer(sys.stdout)
    header = header_text(int(meta.get("feature_dim", 0)))
    try:
        for b in batches:
            if header:
                sys.stdout.write(header)
                header = ""
            writer.write(*_rows_of(b, paths, labels))
        writer.drain()
    finally:
        writer.shutdown()
    return writer.rows


# ----------------------------------------------------------------------------- reading


@dataclass
class FeatureTable:
    paths: list[str]
    labels: list[str | None]
    X: np.ndarray
    meta: dict
    warnings: list[str] = field(default_factory=list)


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(
            f"{path} has no sidecar {side.name}; features tables must come from `tlearn "
            "extract` (the sidecar records the backbone, layer and preprocessing)"
        )
    meta = read_json(side, DataError)
    if not isinstance(meta, dict) or meta.get("format") != "tlearn-features":
        got = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{side}: not a tlearn features sidecar (format={got!r})")
    return meta


def _read_bytes(path: Path) -> bytearray:
    """The whole file in a writable buffer (numpy arrays over it may be changed)."""
    try:
        size = path.stat().st_size
        buf = bytearray(size)
        with open(path, "rb") as f:
            n = f.readinto(buf)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return buf if n == size else buf[:n]


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_binding(path: Path, meta: dict, buf, fmt: TableFormat) -> list[str]:
    """Refuse a table that is not the one its sidecar describes (format, size, sha256);
    a sidecar from before tables were bound gives a warning instead."""
    entry = meta.get("table")
    side = sidecar_path(path).name
    if entry is None:
        return [f"{path}: {OLDER_TLEARN} (its sidecar records no hash of the table)"]
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("rows"), int)
        or not isinstance(entry.get("bytes"), int)
        or not _SHA256.fullmatch(str(entry.get("sha256", "")))
        or entry.get("format") not in _BY_NAME
    ):
        raise DataError(f"{side}: damaged 'table' entry; extract again")
    if entry["format"] != fmt.name:
        raise DataError(
            f"{path} is read as {fmt.name} (its extension) but its sidecar {side} describes a "
            f"{entry['format']} table; keep the extension extract wrote"
        )
    if len(buf) != entry["bytes"] or hashlib.sha256(buf).hexdigest() != entry["sha256"]:
        raise DataError(
            f"{path} does not match its sidecar {side} ({len(buf)} bytes, sidecar records "
            f"{entry['bytes']} and another sha256): the two were not written together; "
            "extract again (or restore the matching pair)"
        )
    return []


def _check_rows(path: Path, meta: dict, rows: int) -> None:
    want = meta.get("rows")
    if want is not None and (not isinstance(want, int) or want != rows):
        raise DataError(
            f"{path} holds {rows} rows but its sidecar {sidecar_path(path).name} says {want}: "
            "the two were not written together; extract again"
        )


def read_table(path: str | Path, *, fmt: TableFormat | None = None) -> FeatureTable:
    """Read a table written by `tlearn extract` (any format) after checking it against
    its sidecar."""
    path = Path(path)
    meta = read_sidecar(path)
    fmt = fmt or table_format(path)
    buf = _read_bytes(path)
    warnings = check_binding(path, meta, buf, fmt)
    paths, labels, X = fmt.parse(buf, meta, path)
    _check_rows(path, meta, len(paths))
    # Row-major, as features computed from images are: BLAS rounds a product of a
    # column-major matrix (pandas' CSV) differently in the last bit.
    X = np.ascontiguousarray(X, dtype=np.float32)
    return FeatureTable(paths=paths, labels=labels, X=X, meta=meta, warnings=warnings)


read_features_csv = read_table  # the name before Parquet and NPY


def verify_table(path: str | Path, meta: dict, fmt: TableFormat) -> list[str]:
    """check_binding and the row count, without parsing the numbers (merge)."""
    path = Path(path)
    buf = _read_bytes(path)
    warnings = check_binding(path, meta, buf, fmt)
    _check_rows(path, meta, fmt.count_rows(buf, meta, path))
    return warnings


# ----------------------------------------------------------------------------- merging


def merge_tables(
    parts: Sequence[tuple[Path, dict]], out: str | Path, extra: dict | None = None
) -> tuple[int, list[str]]:
    """Join the tables of consecutive shards (each checked against its sidecar) into
    `out`, in the format they share, as a single run writes it; then its sidecar.
    Returns (rows, warnings)."""
    out = Path(out)
    names = {(p[1].get("table") or {}).get("format", "csv") for p in parts}
    if len(names) != 1:
        raise DataError(f"the parts are in different formats ({', '.join(sorted(names))})")
    fmt = format_named(names.pop())
    if table_format(out) is not fmt:
        raise UsageError(
            f"the parts are {fmt.name} tables: -o must end in {' or '.join(fmt.suffixes)} "
            f"(got {out.name})"
        )
    warnings = []
    for path, meta in parts:
        warnings += verify_table(path, meta, fmt)
    meta = {k: v for k, v in parts[0][1].items() if k != "shard" and k not in SIDECAR_ONLY}
    meta.update(extra or {})
    digest = fmt.merge(list(parts), out, meta)
    write_json(sidecar_path(out), sidecar_meta(meta, digest, fmt))
    return digest.rows, warnings
