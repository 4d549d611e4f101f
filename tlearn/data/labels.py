"""Images and labels from a CSV with a `path,label` header (--labels FILE); with
multi_label, each label cell holds a set of labels joined by ';' (empty: no label)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from tlearn.core.errors import DataError
from tlearn.core.labelsets import join_labels, parse_label_set
from tlearn.data.imageset import ImageSet, SeenFiles, Skipped, entry_stat, no_images_error

# --- labels CSV -----------------------------------------------------------------------------


def _csv_rows(csv_path: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) for each non-blank row, header included."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.reader(f, skipinitialspace=True)
            return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path} is not UTF-8 text ({e.reason})") from e
    except csv.Error as e:
        raise DataError(f"{csv_path}: not a valid CSV file ({e})") from e


def _header_columns(rows: list[tuple[int, list[str]]], csv_path: str) -> tuple[int, int]:
    """Column indices of `path` and `label` in the first row."""
    line, header = rows[0] if rows else (1, [])
    names = [h.strip().lower() for h in header]
    if "path" not in names or "label" not in names:
        got = f"'{','.join(header)}'" if header else "an empty file"
        raise DataError(
            f"{csv_path}: line {line}: expected a header with columns 'path' and 'label', "
            f"got {got}; add the line 'path,label' at the top"
        )
    return names.index("path"), names.index("label")


def read_labels_csv(
    csv_path, classes: Sequence[str] | None = None, multi_label: bool = False
) -> ImageSet:
    """Images and labels from a CSV with a `path,label` header (other columns ignored).

    Relative paths are resolved against the CSV's folder. Rows keep the file's order. Files
    that exist but are unusable from their metadata (zero bytes, broken symlink) become
    `Skipped`; every other problem is a DataError naming the line. Classes default to the
    sorted unique labels of the usable rows.

    multi_label: a cell's labels are a set (sorted, joined by ';'; an empty cell is the
    empty set), and each distinct set is one of the ImageSet's "classes"; `classes` then
    lists the allowed labels.
    """
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise DataError(f"labels file {csv_path} does not exist")
    rows = _csv_rows(csv_path)
    columns = _header_columns(rows, csv_path)
    base = os.path.dirname(csv_path)

    paths: list[str] = []
    names: list[str] = []
    skipped: list[Skipped] = []
    lost: list[str] = []  # labels of skipped rows, to tell when a whole class is gone
    first_line: dict[str, int] = {}
    seen = SeenFiles()  # the same file under two names (a symlink): once, or an error
    for line, row in rows[1:]:
        where = f"{csv_path}: line {line}"
        path, label = _csv_entry(row, columns, base, where, classes, multi_label)
        key = os.path.abspath(path)
        if key in first_line:
            raise DataError(f"{where}: duplicate path {path} (first on line {first_line[key]})")
        first_line[key] = line
        st, problem = entry_stat(path)
        if problem:
            skipped.append(Skipped(path, problem))
            lost.append(label)
        elif seen.claim(path, st, label):
            paths.append(path)
            names.append(label)

    same_file = seen.check()
    if not paths:
        raise no_images_error(csv_path, skipped)
    used = set(names)
    if multi_label:
        class_list = sorted(used)
        index = {name: i for i, name in enumerate(class_list)}
        return ImageSet(paths, [index[n] for n in names], class_list, skipped, [])
    if classes is None:
        class_list = sorted(used)
        notes = [f"class '{c}' has no usable images; left out" for c in sorted(set(lost) - used)]
    else:
        class_list = list(classes)
        notes = [f"class '{c}' has no images in {csv_path}" for c in class_list if c not in used]
    index = {name: i for i, name in enumerate(class_list)}
    return ImageSet(paths, [index[n] for n in names], class_list, skipped, same_file + notes)


def _path_cell(cell: str, base: str) -> str:
    """The path as written when a file of that name exists, spaces included (a leading space
    kept inside quotes, a trailing one); else without the surrounding spaces. (Spaces before
    an unquoted path are dropped by the reader: quote a name that starts with a space.)"""
    stripped = cell.strip()
    if cell != stripped and cell.strip() and os.path.lexists(os.path.join(base, cell)):
        return cell
    return stripped


def _csv_entry(
    row: list[str], columns: tuple[int, int], base: str, where: str, classes, multi=False
) -> tuple[str, str]:
    """(resolved path, label) of one data row; DataError for anything the user must fix."""
    path_col, label_col = columns
    need = max(columns) + 1
    if len(row) < need:
        raise DataError(f"{where}: expected at least {need} columns, got {len(row)}")
    raw_path, label = _path_cell(row[path_col], base), row[label_col].strip()
    if not raw_path:
        raise DataError(f"{where}: empty path")
    if multi:
        label = join_labels(parse_label_set(label))
        unknown = [lab for lab in parse_label_set(label) if classes and lab not in classes]
        if unknown:
            raise DataError(
                f"{where}: label '{unknown[0]}' is not one of the model's labels "
                f"({', '.join(classes)})"
            )
    elif not label:
        raise DataError(f"{where}: empty label for {raw_path}")
    if not multi and classes is not None and label not in classes:
        raise DataError(
            f"{where}: label '{label}' is not one of the known classes ({', '.join(classes)})"
        )
    path = os.path.normpath(os.path.join(base, raw_path))
    if not os.path.lexists(path):
        hint = "relative paths are resolved against the CSV's folder"
        raise DataError(f"{where}: {path} does not exist ({hint})")
    if os.path.isdir(path):
        raise DataError(f"{where}: {path} is a directory, not an image file")
    return path, label
