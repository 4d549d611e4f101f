"""Features as Parquet (pyarrow): columns path, label (strings; a missing label is null)
and f0..fN, one float32 column per feature, exactly as in the CSV, so
`pandas.read_parquet` gives the DataFrame `pandas.read_csv` gives of the CSV, with the
same float32 numbers. A column per feature rather than one list column: pandas (and
polars, DuckDB, Spark) read plain float columns into a numeric frame, while a list
column becomes an object column of arrays there. The sidecar's metadata is also in the
Parquet schema metadata (key "tlearn", JSON).

Row groups hold a fixed number of rows for a given feature size (row_group_rows: about
64 MiB of features), so a merged file groups rows exactly as a single run's does and the
two are byte-identical. No compression (float features barely compress; speed matters
more), dictionary encoding for the label only.

A Parquet file can be read back only once its footer is written, so a killed run's
Parquet bytes are lost; its rows are not: the write keeps the .npy journal of
npy_format (OUTPUT.partial + OUTPUT.partial.rows) beside the Parquet file being built
(OUTPUT.partial.parquet), and --resume rebuilds the Parquet file from the journal's rows.
The journal doubles the bytes written while the run lasts and is deleted at the end."""

from __future__ import annotations

import contextlib
import json
import os
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
    sync_close,
)
from tlearn.features.formats.npy_format import NpyWriter, journal_path, recover_journal

META_KEY = b"tlearn"
ROW_GROUP_BYTES = 64 << 20
SIDECAR_ONLY = ("rows", "table", "paths", "labels")  # not known when the schema is written


def row_group_rows(dim: int) -> int:
    """Rows per row group: ~64 MiB of features, between 1,024 and 65,536 rows."""
    return int(min(65536, max(1024, ROW_GROUP_BYTES // (4 * max(1, dim)))))


def schema_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in SIDECAR_ONLY}


def _schema(dim: int, meta: dict):
    # pyarrow costs ~0.1 s to import: only Parquet tables need it
    import pyarrow as pa

    fields = [pa.field("path", pa.string()), pa.field("label", pa.string())]
    fields += [pa.field(f"f{i}", pa.float32()) for i in range(dim)]
    text = json.dumps(schema_meta(meta), sort_keys=True)
    return pa.schema(fields, metadata={META_KEY: text.encode("utf-8")})


class ParquetRows:
    """Rows buffered into row groups of exactly row_group_rows(dim) rows (the last one
    shorter) and written to `sink` (a binary file)."""

    def __init__(self, sink, dim: int, meta: dict):
        # pyarrow costs ~0.1 s to import: only Parquet tables need it
        import pyarrow.parquet as pq

        self.dim = dim
        self.group = row_group_rows(dim)
        self.schema = _schema(dim, meta)
        self.writer = pq.ParquetWriter(
            sink, self.schema, compression="none", use_dictionary=["label"]
        )
        self.pending: list[tuple[list, list, np.ndarray]] = []
        self.n_pending = 0

    def write(self, paths, labels, X) -> None:
        self.pending.append(([str(p) for p in paths], list(labels), np.asarray(X, np.float32)))
        self.n_pending += len(paths)
        while self.n_pending >= self.group:
            self._write_group(self.group)

    def _write_group(self, n: int) -> None:
        # pyarrow costs ~0.1 s to import: only Parquet tables need it
        import pyarrow as pa

        paths, labels, parts, taken = [], [], [], 0
        while taken < n:
            p, lab, X = self.pending[0]
            k = min(n - taken, len(p))
            paths += p[:k]
            labels += lab[:k]
            parts.append(X[:k])
            if k == len(p):
                self.pending.pop(0)
            else:
                self.pending[0] = (p[k:], lab[k:], X[k:])
            taken += k
        self.n_pending -= n
        Xt = np.ascontiguousarray(np.concatenate(parts).T, dtype=np.float32)  # column-major
        # Arrays from buffers: zero-copy for the features, and unlike pa.array() on a list
        # or an ndarray it does not import pandas (0.2-0.4 s on a small machine)
        columns = [string_array(paths), string_array(labels)]
        f32 = pa.float32()
        columns += [pa.Array.from_buffers(f32, n, [None, pa.py_buffer(c)]) for c in Xt]
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema), row_group_size=n)

    def close(self) -> None:
        if self.n_pending:
            self._write_group(self.n_pending)
        self.writer.close()


def string_array(values: list):
    """A pyarrow string array of `values` (None: null), built from its buffers."""
    # pyarrow costs ~0.1 s to import: only Parquet tables need it
    import pyarrow as pa

    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    valid = np.asarray([v is not None for v in values], dtype=bool)
    nulls = int(len(values) - valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(
        pa.string(), len(values), [bitmap, pa.py_buffer(offsets), data], null_count=nulls
    )


def building_path(partial: Path) -> Path:
    return Path(f"{partial}.parquet")


class ParquetWriter(RowWriter):
    """The Parquet file built as rows come (OUTPUT.partial.parquet, hashed as written),
    and the .npy journal that lets --resume keep the rows (OUTPUT.partial[.rows])."""

    def __init__(self, partial: Path, meta: dict, kept: list[Row], expected: int):
        dim = int(meta["feature_dim"])
        self.partial = partial
        self.journal = NpyWriter(partial, dim, kept, expected, hashed=False)
        self.f = open(building_path(partial), "wb")
        self.file = HashingFile(self.f)
        try:
            self.rows_out = ParquetRows(self.file, dim, meta)
            if kept:  # rebuild the Parquet rows of the interrupted run from its journal
                X = self.journal.kept_matrix(len(kept))
                step = self.rows_out.group
                for lo in range(0, len(kept), step):
                    chunk = kept[lo : lo + step]
                    self.rows_out.write(
                        [p for p, _ in chunk], [lab for _, lab in chunk], X[lo : lo + step]
                    )
        except BaseException:
            self.close()
            raise

    @property
    def rows(self) -> int:
        return self.journal.rows

    def write(self, paths, labels, X) -> None:
        self.journal.write(paths, labels, X)
        self.rows_out.write(paths, labels, X)

    def finish(self, out: Path) -> Digest:
        self.rows_out.close()
        sync_close(self.f)
        os.replace(building_path(self.partial), out)
        self.journal.remove()
        return Digest(self.file.hexdigest(), self.journal.rows, self.file.n)

    def close(self) -> None:
        rows_out = getattr(self, "rows_out", None)
        if rows_out is not None and not self.f.closed:
            with contextlib.suppress(Exception):  # pyarrow would close it later, on a closed file
                rows_out.writer.close()
        if not self.f.closed:
            self.f.close()
        building_path(self.partial).unlink(missing_ok=True)  # rebuilt from the journal
        self.journal.close()


class ParquetFormat(TableFormat):
    name = "parquet"
    suffixes = (".parquet", ".pq")

    def recover(self, partial: Path, dim: int) -> list[Row]:
        return recover_journal(partial, dim)

    def open(self, partial: Path, meta: dict, kept: list[Row], expected: int) -> RowWriter:
        return ParquetWriter(partial, meta, kept, expected)

    def partial_files(self, partial: Path) -> list[Path]:
        return [partial, journal_path(partial), building_path(partial)]

    def _table(self, buf, path):
        # pyarrow costs ~0.1 s to import: only Parquet tables need it
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(pa.BufferReader(buf))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read features Parquet file {path}: {e}") from None

    def parse(self, buf, meta: dict, path: Path):
        # pyarrow costs ~0.1 s to import: only Parquet tables need it
        import pyarrow as pa

        table = self._table(buf, path)
        dim = int(meta.get("feature_dim", table.num_columns - 2))
        names = ["path", "label", *(f"f{i}" for i in range(dim))]
        if table.column_names != names:
            got = ",".join(table.column_names[:4])
            raise DataError(f"{path}: columns must be path,label,f0..f{dim - 1} (got {got}...)")
        types = [table.schema.field(i).type for i in range(table.num_columns)]
        if types[:2] != [pa.string(), pa.string()] or any(t != pa.float32() for t in types[2:]):
            raise DataError(f"{path}: path and label must be strings, f0..f{dim - 1} float32")
        X = np.empty((table.num_rows, dim), dtype=np.float32)
        for i in range(dim):
            col = table.column(2 + i)
            if col.null_count:
                raise DataError(f"{path}: column f{i} has missing values")
            X[:, i] = col.to_numpy()
        paths = table.column(0)
        if paths.null_count:
            raise DataError(f"{path}: a row has no path")
        return paths.to_pylist(), table.column(1).to_pylist(), X

    def count_rows(self, buf, meta: dict, path: Path) -> int:
        # pyarrow costs ~0.1 s to import: only Parquet tables need it
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(pa.BufferReader(buf)).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read features Parquet file {path}: {e}") from None

    def merge(self, parts, out: Path, meta: dict) -> Digest:
        # pyarrow costs ~0.1 s to import: only Parquet tables need it
        import pyarrow.parquet as pq

        dim = int(meta["feature_dim"])
        rows = 0
        with atomic_file(out, "wb") as f:
            hf = HashingFile(f)
            writer = ParquetRows(hf, dim, meta)
            for path, _ in parts:
                # one row group at a time: memory stays at a row group, not a part
                for batch in pq.ParquetFile(path).iter_batches(batch_size=writer.group):
                    cols = batch.columns
                    X = np.stack([c.to_numpy() for c in cols[2:]], axis=1) if dim else None
                    if X is None:
                        X = np.zeros((batch.num_rows, 0), np.float32)
                    writer.write(cols[0].to_pylist(), cols[1].to_pylist(), X)
                    rows += batch.num_rows
            writer.close()
        return Digest(hf.hexdigest(), rows, hf.n)
