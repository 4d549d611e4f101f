"""Features as a .npy file: one float32 matrix (rows x features) exactly as numpy.save
writes it, so `numpy.load` reads it (memory-mapped if wanted). Paths and labels are in
the sidecar ("paths", "labels"), in row order.

An interrupted write keeps its finished rows: OUTPUT.partial is the .npy itself (its
header names the rows the run expects; numpy leaves room in the header for the row
count to grow, so it is rewritten in place at the end), rows are appended batch by batch,
and OUTPUT.partial.rows records each row's path,label as CSV lines. --resume keeps the
rows both files hold completely. The same journal backs a Parquet write
(parquet_format), which cannot be read back before its footer is written."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file
from tlearn.core.errors import DataError
from tlearn.features.formats.common import (
    Digest,
    HashingFile,
    Row,
    RowWriter,
    TableFormat,
    complete_csv_rows,
    csv_lines,
    label_text,
    sha256_of,
    sync_close,
    text_label,
)

DTYPE = np.dtype("<f4")
GROWTH_DIGITS = 21  # numpy's room for the first axis to grow in place (np.lib.format)


def npy_header(rows: int, dim: int) -> bytes:
    """The .npy (version 1.0) header numpy.save writes for a (rows, dim) float32 C-order
    matrix; the same length for any row count up to 21 digits."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    text += " " * max(0, GROWTH_DIGITS - len(str(rows)))
    pad = 64 - (10 + len(text) + 1) % 64
    text += " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def read_header(f, path) -> tuple[tuple[int, ...], int]:
    """(shape, offset of the data) of a float32 C-order .npy opened as `f`, else DataError."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a valid .npy file ({e})") from None
    if dtype != DTYPE or fortran or len(shape) != 2:
        raise DataError(
            f"{path}: a features .npy holds one float32 matrix in C order (found {dtype}, "
            f"shape {shape}{', Fortran order' if fortran else ''})"
        )
    return shape, f.tell()


def journal_path(partial: Path) -> Path:
    return Path(f"{partial}.rows")


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


class NpyWriter(RowWriter):
    """Rows appended to OUTPUT.partial (a .npy) and their path,label to OUTPUT.partial.rows.
    `hashed`: hash the .npy as written (the finished table); a Parquet write uses this as
    its journal only and skips that."""

    def __init__(self, partial: Path, dim: int, kept: list[Row], expected: int, hashed: bool):
        self.partial, self.dim = partial, dim
        self.header_rows = max(expected, len(kept))
        self.paths = [p for p, _ in kept]
        self.labels = [lab for _, lab in kept]
        self.rows = len(kept)
        self.hashed = hashed
        header = npy_header(self.header_rows, dim)
        if kept:
            f = open(partial, "r+b")
            f.write(header)  # the same length: the kept rows stay where they are
            f.flush()
            h = sha256_of(partial) if hashed else _NoHash()
            f.seek(0, os.SEEK_END)
            self.file = HashingFile(f, h, f.tell())
            self.journal = open(journal_path(partial), "ab")
        else:
            self.file = HashingFile(open(partial, "wb"), None if hashed else _NoHash())
            self.file.write(header)
            self.journal = open(journal_path(partial), "wb")

    def write(self, paths, labels, X) -> None:
        X = np.ascontiguousarray(X, dtype=DTYPE)
        if X.ndim != 2 or X.shape[1] != self.dim or len(X) != len(paths):
            raise ValueError(f"rows of {self.dim} features expected, got shape {X.shape}")
        self.file.write(memoryview(X).cast("B"))
        lines = [(str(p), label_text(lab)) for p, lab in zip(paths, labels, strict=True)]
        self.journal.write(csv_lines(lines))
        self.file.flush()  # a killed run keeps every finished batch for --resume
        self.journal.flush()
        self.paths.extend(str(p) for p in paths)
        self.labels.extend(labels)
        self.rows += len(paths)

    def finish(self, out: Path) -> Digest:
        """Fix the header's row count, rename the .npy to `out`, drop the journal."""
        f = self.file.f
        if self.rows != self.header_rows:  # some images were skipped
            f.seek(0)
            f.write(npy_header(self.rows, self.dim))
            f.flush()
            self.file.h = sha256_of(self.partial) if self.hashed else _NoHash()
        size = self.file.n
        sync_close(f)
        self.journal.close()
        os.replace(self.partial, out)
        journal_path(self.partial).unlink(missing_ok=True)
        extra = {"paths": self.paths, "labels": self.labels}
        return Digest(self.file.hexdigest(), self.rows, size, extra)

    def remove(self) -> None:
        """Close and delete both files (a Parquet write is done with its journal)."""
        self.close()
        self.partial.unlink(missing_ok=True)
        journal_path(self.partial).unlink(missing_ok=True)

    def close(self) -> None:
        for f in (self.file.f, self.journal):
            if not f.closed:
                f.close()

    def kept_matrix(self, kept: int) -> np.ndarray:
        """The first `kept` rows already in the file (memory-mapped)."""
        offset = len(npy_header(self.header_rows, self.dim))
        return np.memmap(self.partial, DTYPE, "r", offset, (kept, self.dim))


def recover_journal(partial: Path, dim: int) -> list[Row]:
    """Rows complete in both OUTPUT.partial and OUTPUT.partial.rows; both cut to them."""
    journal = journal_path(partial)
    if not journal.is_file():
        return []
    try:
        with open(partial, "rb") as f:
            shape, offset = read_header(f, partial)
    except (OSError, DataError):
        return []
    if shape[1] != dim:
        return []
    size = partial.stat().st_size
    rows, ends = complete_csv_rows(journal.read_bytes(), 2)
    n = min(len(rows), max(0, (size - offset) // (dim * DTYPE.itemsize)))
    with open(partial, "r+b") as f:
        f.truncate(offset + n * dim * DTYPE.itemsize)
    with open(journal, "r+b") as f:
        f.truncate(ends[n - 1] if n else 0)
    return [(r[0], text_label(r[1])) for r in rows[:n]]


def _checked_list(meta: dict, key: str, rows: int, path, allow_none: bool) -> list:
    values = meta.get(key)
    if not isinstance(values, list) or len(values) != rows:
        raise DataError(
            f"{path}: its sidecar must list the {key} of all {rows} rows (found "
            f"{len(values) if isinstance(values, list) else type(values).__name__}); "
            "extract again"
        )
    if any(not (isinstance(v, str) or (allow_none and v is None)) for v in values):
        raise DataError(f"{path}: its sidecar's {key} must be strings; extract again")
    return values


class NpyFormat(TableFormat):
    name = "npy"
    suffixes = (".npy",)

    def recover(self, partial: Path, dim: int) -> list[Row]:
        return recover_journal(partial, dim)

    def open(self, partial: Path, meta: dict, kept: list[Row], expected: int) -> RowWriter:
        return NpyWriter(partial, int(meta["feature_dim"]), kept, expected, hashed=True)

    def partial_files(self, partial: Path) -> list[Path]:
        return [partial, journal_path(partial)]

    def _matrix(self, buf, meta: dict, path) -> np.ndarray:
        (rows, dim), offset = read_header(io.BytesIO(memoryview(buf)[:65536]), path)
        if dim != int(meta.get("feature_dim", dim)):
            raise DataError(
                f"{path}: {dim} features per row but the sidecar says {meta['feature_dim']}"
            )
        if len(buf) != offset + rows * dim * DTYPE.itemsize:
            raise DataError(
                f"{path}: {len(buf)} bytes do not hold the {rows}x{dim} its header says"
            )
        return np.frombuffer(buf, DTYPE, rows * dim, offset).reshape(rows, dim)

    def parse(self, buf, meta: dict, path: Path):
        X = self._matrix(buf, meta, path)
        paths = _checked_list(meta, "paths", len(X), path, allow_none=False)
        labels = _checked_list(meta, "labels", len(X), path, allow_none=True)
        return list(paths), list(labels), X

    def count_rows(self, buf, meta: dict, path: Path) -> int:
        return len(self._matrix(buf, meta, path))

    def merge(self, parts, out: Path, meta: dict) -> Digest:
        dim = int(meta["feature_dim"])
        total = sum(int(m["rows"]) for _, m in parts)
        paths: list = []
        labels: list = []
        with atomic_file(out, "wb") as f:
            hf = HashingFile(f)
            hf.write(npy_header(total, dim))
            for path, part_meta in parts:
                with open(path, "rb") as src:
                    read_header(src, path)
                    while chunk := src.read(1 << 20):
                        hf.write(chunk)
                paths += part_meta["paths"]
                labels += part_meta["labels"]
        return Digest(hf.hexdigest(), total, hf.n, {"paths": paths, "labels": labels})
