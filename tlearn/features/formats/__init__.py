"""The file formats of a features table, one module each (csv_format, npy_format,
parquet_format), all behind the one interface of tlearn.features.table: callers never
branch on the format. `common` holds what they share (the TableFormat interface, the
hashing file, the row journal of an interrupted write)."""
