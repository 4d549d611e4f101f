"""What the table formats share: the interface each implements (TableFormat, RowWriter),
the file that hashes what is written through it (a sidecar binds its table by that
sha256), and reading back the complete CSV rows of a file a killed run left behind
(the CSV partial itself, or the path,label journal beside a binary partial)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Row = tuple[str, "str | None"]  # (path, label) of a row already written


@dataclass
class Digest:
    """What the sidecar records of a finished table: its sha256 and size as written, its
    rows, and any fields the format keeps in the sidecar (npy: paths and labels)."""

    sha256: str
    rows: int
    bytes: int
    extra: dict = field(default_factory=dict)


class HashingFile:
    """A binary file that hashes (sha256) and counts every byte written through it, so a
    table's hash costs no second read. Enough of a file for pyarrow's writer."""

    def __init__(self, f, h=None, written: int = 0):
        self.f = f
        self.h = h if h is not None else hashlib.sha256()
        self.n = written

    def write(self, data) -> int:
        self.f.write(data)
        self.h.update(data)
        n = memoryview(data).nbytes
        self.n += n
        return n

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def close(self) -> None:  # the owner closes the real file (after fsync)
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def sha256_of(path: str | Path, upto: int | None = None, h=None):
    """A sha256 object fed the first `upto` bytes of `path` (all when None)."""
    h = h if h is not None else hashlib.sha256()
    left = os.path.getsize(path) if upto is None else upto
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h


def sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class RowWriter:
    """Writes rows to a partial file; `finish` completes it and renames it to the output,
    `close` leaves it as it is (interrupted: --resume continues it)."""

    rows: int

    def write(self, paths: Sequence[str], labels: Sequence[str | None], X: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self, out: Path) -> Digest:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TableFormat:
    """One file format of a features table. `partial` is OUTPUT.partial; a format may keep
    more files beside it, all named OUTPUT.partial*."""

    name = ""
    suffixes: tuple[str, ...] = ()

    def recover(self, partial: Path, dim: int) -> list[Row]:
        """The complete rows an interrupted write left in `partial` (after cutting off a
        half-written tail, in place), in order; [] when there is nothing usable."""
        raise NotImplementedError

    def open(self, partial: Path, meta: dict, kept: list[Row], expected: int) -> RowWriter:
        """A writer appending to the `kept` rows of `partial` (a fresh file when none);
        `expected`: the rows the finished table will likely hold."""
        raise NotImplementedError

    def parse(self, buf, meta: dict, path: Path):
        """(paths, labels, X float32) from the bytes of a whole table file."""
        raise NotImplementedError

    def count_rows(self, buf, meta: dict, path: Path) -> int:
        return len(self.parse(buf, meta, path)[0])

    def merge(self, parts: list[tuple[Path, dict]], out: Path, meta: dict) -> Digest:
        """Join tables of this format, in order, into `out` (atomically)."""
        raise NotImplementedError

    def partial_files(self, partial: Path) -> list[Path]:
        return [partial]


# ----------------------------------------------------------------------------- CSV rows


def complete_csv_rows(data: bytes, ncols: int) -> tuple[list[list[str]], list[int]]:
    """The rows of `data` (CSV, any line ending, quoted fields may hold newlines) up to the
    first damaged one: a row without `ncols` fields or not ended by a newline. Returns the
    rows and the byte offset where each ends."""
    text = data.decode("utf-8", errors="surrogateescape")
    consumed = [0, ""]

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):
            consumed[0] += len(line.encode("utf-8", errors="surrogateescape"))
            consumed[1] = line
            yield line

    rows, ends = [], []
    reader = csv.reader(lines())
    try:
        for row in reader:
            if len(row) != ncols or not consumed[1].endswith(("\n", "\r")):
                break
            rows.append(row)
            ends.append(consumed[0])
    except csv.Error:  # a quoted field cut off by the kill
        pass
    return rows, ends


def csv_lines(rows: Sequence[Sequence[str]]) -> bytes:
    """CSV text of `rows` (csv module quoting, \\r\\n line ends), encoded."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def label_text(label: str | None) -> str:
    return "" if label is None else label


def text_label(text: str) -> str | None:
    return None if text == "" else text
