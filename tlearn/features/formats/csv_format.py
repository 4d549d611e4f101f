"""Features as CSV: path, label, f0..fN, each float32 as the shortest text that reads back
to the same float32 (numpy's repr). The partial file is the CSV itself, flushed batch by
batch; a killed run keeps every complete row. On machines with cores to spare the text
is made in worker processes while extraction goes on (csv_workers)."""

from __future__ import annotations

import csv
import io
import os
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file
from tlearn.core.errors import DataError
from tlearn.core.system import cpu_cores
from tlearn.data.decode import worker_pool
from tlearn.features.formats.common import (
    Digest,
    HashingFile,
    Row,
    RowWriter,
    TableFormat,
    complete_csv_rows,
    label_text,
    sha256_of,
    sync_close,
    text_label,
)


def feature_columns(dim: int) -> list[str]:
    return [f"f{i}" for i in range(dim)]


def header_text(dim: int) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(["path", "label", *feature_columns(dim)])
    return buf.getvalue()


def csv_text(job) -> tuple[str, int]:
    """(CSV lines, rows) of one batch: path, label, then each float32 as the shortest
    string that reads back to the same float32 (numpy's repr)."""
    paths, labels, features = job
    buf = io.StringIO()
    writer = csv.writer(buf)
    for path, label, row in zip(paths, labels, features.astype(str), strict=True):
        writer.writerow([path, label_text(label), *row])
    return buf.getvalue(), len(paths)


def csv_workers(cores: int | None = None) -> int:
    """Processes that turn features into CSV text (~1,000 rows of 1,280 features a second
    each): none on small machines, where every core already decodes or computes; on a
    16-core GPU machine the text written in the main process capped extraction at that
    rate (docs/benchmarks.md, GPU section)."""

    cores = cpu_cores() if cores is None else cores
    return 0 if cores < 8 else min(4, cores // 4)


class CsvWriter(RowWriter):
    """Batches of rows to CSV text, in order: formatted here, or in `workers` processes
    (at most 2 batches each in flight). `emit(text)` receives the text."""

    def __init__(self, emit, workers: int, rows: int = 0):
        self.emit = emit
        self.rows = rows
        self.pool = worker_pool(workers) if workers > 0 else None
        self.in_flight = 2 * workers
        self.pending: deque = deque()

    def write(self, paths, labels, X) -> None:
        job = ([str(p) for p in paths], list(labels), X)
        if self.pool is None:
            self._emit(csv_text(job))
            return
        self.pending.append((job[0][0] if job[0] else "", self.pool.submit(csv_text, job)))
        while len(self.pending) > self.in_flight or (self.pending and self.pending[0][1].done()):
            self._take()

    def _take(self) -> None:
        first, future = self.pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            raise DataError(f"a CSV-writing worker process died near {first}; run again") from None
        self._emit(result)

    def _emit(self, result: tuple[str, int]) -> None:
        self.emit(result[0])
        self.rows += result[1]

    def drain(self) -> None:
        while self.pending:
            self._take()
        self.shutdown()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class CsvFileWriter(CsvWriter):
    """CsvWriter into OUTPUT.partial, flushed batch by batch, hashed as written."""

    def __init__(self, partial: Path, dim: int, kept: int, workers: int):
        if kept:
            h = sha256_of(partial)  # the kept rows are part of the table's bytes
            f = open(partial, "ab")
            self.file = HashingFile(f, h, f.tell())
        else:
            self.file = HashingFile(open(partial, "wb"))
        self.partial = partial
        super().__init__(self._write_text, workers, kept)
        if not kept:
            self.file.write(header_text(dim).encode("utf-8"))

    def _write_text(self, text: str) -> None:
        self.file.write(text.encode("utf-8"))
        self.file.flush()  # a killed run keeps every finished batch for --resume

    def finish(self, out: Path) -> Digest:
        self.drain()
        sync_close(self.file.f)
        os.replace(self.partial, out)
        return Digest(self.file.hexdigest(), self.rows, self.file.n)

    def close(self) -> None:
        self.shutdown()
        if not self.file.f.closed:
            self.file.f.close()


class CsvFormat(TableFormat):
    name = "csv"
    suffixes = (".csv",)

    def recover(self, partial: Path, dim: int) -> list[Row]:
        data = partial.read_bytes()
        rows, ends = complete_csv_rows(data, 2 + dim)
        good = 0
        if rows and rows[0] == ["path", "label", *feature_columns(dim)]:
            good = len(rows)
        with open(partial, "r+b") as f:
            f.truncate(ends[good - 1] if good else 0)
        return [(r[0], text_label(r[1])) for r in rows[1:good]]

    def open(self, partial: Path, meta: dict, kept: list[Row], expected: int) -> RowWriter:
        return CsvFileWriter(partial, int(meta["feature_dim"]), len(kept), csv_workers())

    def parse(self, buf, meta: dict, path: Path):
        # pandas costs ~0.5 s to import: only reading a table needs it
        import pandas as pd

        try:
            df = pd.read_csv(
                io.BytesIO(buf), dtype={"path": str, "label": str}, keep_default_na=False
            )
        except Exception as e:
            raise DataError(f"cannot read features CSV {path}: {e}") from None
        cols = list(df.columns)
        if cols[:2] != ["path", "label"] or any(not c.startswith("f") for c in cols[2:]):
            raise DataError(
                f"{path}: header must be path,label,f0..fN (got {','.join(cols[:4])}...)"
            )
        if len(cols) - 2 != int(meta.get("feature_dim", len(cols) - 2)):
            raise DataError(
                f"{path}: {len(cols) - 2} feature columns but the sidecar says "
                f"{meta.get('feature_dim')}"
            )
        try:
            X = df.iloc[:, 2:].to_numpy(dtype=np.float32)
        except ValueError as e:
            raise DataError(f"{path}: non-numeric feature value ({e})") from None
        labels = [text_label(lab) for lab in df["label"].tolist()]
        return df["path"].tolist(), labels, X

    def count_rows(self, buf, meta: dict, path: Path) -> int:
        rows, _ = complete_csv_rows(bytes(buf), 2 + int(meta["feature_dim"]))
        return max(0, len(rows) - 1)

    def merge(self, parts, out: Path, meta: dict) -> Digest:
        header = None
        rows = 0
        with atomic_file(out, "wb") as f:
            hf = HashingFile(f)
            for path, part_meta in parts:
                with open(path, "rb") as src:
                    # The header is path,label,f0..fN: never quoted, so it ends at the first \n.
                    head = src.readline()
                    if header is None:
                        header = head
                        hf.write(head)
                    elif head != header:
                        raise DataError(f"{path} has another CSV header than {parts[0][0]}")
                    while chunk := src.read(1 << 20):
                        hf.write(chunk)
                rows += int(part_meta["rows"])
        return Digest(hf.hexdigest(), rows, hf.n)


def stdout_writer(out) -> CsvWriter:
    """CSV rows to a text stream (`-o -`): header first, no partial file, no sidecar."""
    return CsvWriter(out.write, csv_workers())
