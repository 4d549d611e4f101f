"""The list of images that could not be used (skipped.csv), and the --strict failure that
names them. One formatter: every command writes the same columns the same way."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from tlearn.core.atomic import atomic_file
from tlearn.core.errors import NothingReadError, StrictModeError
from tlearn.data.imageset import Skipped

SKIPPED_CSV = "skipped.csv"  # inside a folder tlearn makes (model directory, report folder)


def skipped_path(output: str | Path) -> Path:
    """The skipped list of an output file: named after it (`features.csv` ->
    `features.csv.skipped.csv`), so two runs into one folder never share a list."""
    return Path(f"{output}.skipped.csv")


def skipped_csv_bytes(skipped: Sequence[Skipped]) -> bytes:
    """skipped.csv's content: a `path,reason` header, then one row per skipped image."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows([s.path, s.reason] for s in skipped)
    return buf.getvalue().encode("utf-8")


def write_skipped_csv(path: str | Path, skipped: Sequence[Skipped]) -> Path:
    """Write skipped_csv_bytes to `path` atomically."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        f.write(skipped_csv_bytes(skipped))
    return path


def strict_failure(skipped: Sequence[Skipped]) -> StrictModeError:
    """The --strict error for these unreadable images (the first ten named)."""
    listed = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return StrictModeError(
        f"--strict: {len(skipped)} unreadable image(s), nothing written: {listed}{more}"
    )


def nothing_read(where, skipped: Sequence[Skipped], list_path=None) -> NothingReadError:
    """The error when not one image could be read; with `list_path`, the skipped list is
    written there first and the error names it."""
    if list_path is not None:
        write_skipped_csv(list_path, skipped)
    return NothingReadError(where, skipped, listed_in=list_path)


def require_some_read(n_read: int, skipped: Sequence[Skipped], where, list_path=None) -> None:
    """One rule for every command: images were given, none could be read -> exit 3."""
    if n_read == 0 and skipped:
        raise nothing_read(where, skipped, list_path)
