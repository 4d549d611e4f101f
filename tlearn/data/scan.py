"""Find images (class folders, label CSVs, plain inputs) and read them robustly.

Scanning is cheap: it walks folders and looks at names and file metadata only, so a folder of
a million images scans in seconds. Anything that needs decoding is found by `load_image`, which
the feature extractor calls once per image (in worker processes) and whose `ImageLoadError`
becomes one row of skipped.csv.

No torch here, and no printing: problems come back as `Skipped` entries and warning strings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tlearn.core.errors import DataError
from tlearn.data.imageset import ImageSet, Skipped, entry_problem, is_image_name, no_images_error
from tlearn.data.labels import read_labels_csv


def _walk_images(folder: str) -> tuple[list[str], list[Skipped]]:
    """Image files under `folder` (recursive, sorted by path components) and the skipped ones.

    Hidden entries and files without an image extension are ignored silently. Symlinked
    folders are followed, each real folder once, so a symlink loop cannot hang the scan.
    """
    found: list[str] = []
    skipped: list[Skipped] = []
    visited: set[tuple[int, int]] = set()

    def visit(directory: str) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in visited:
                return
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append(Skipped(directory, f"cannot read folder ({e.strerror or e})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if is_image_name(entry.name):
                problem = entry_problem(entry.path)
                if problem:
                    skipped.append(Skipped(entry.path, problem))
                else:
                    found.append(entry.path)
            elif _is_dir(entry):
                visit(entry.path)

    visit(folder)
    return found, skipped


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _require_dir(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{what} {path} is not a folder")
    return path


def _class_dirs(root: str) -> tuple[list[str], int]:
    """Visible sub-folder names of `root` (sorted) and the number of images lying loose in it."""
    names: list[str] = []
    loose = 0
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if is_image_name(entry.name) and entry.is_file():
                loose += 1
            elif _is_dir(entry):
                names.append(entry.name)
    return sorted(names), loose


def scan_class_folders(root, classes: Sequence[str] | None = None) -> ImageSet:
    """Images in root/<class>/... (any depth below the class folder), labelled by class folder.

    Without `classes`, the classes are the sub-folders that hold images, sorted by name; empty
    ones are left out with a warning. With `classes` (e.g. a fitted model's), that exact list
    and order is used; a folder with images whose name is not in it is a DataError.
    Paths come class by class, each class sorted by path.
    """
    return _scan_class_folders(root, classes, known_as="the known classes")


def _scan_class_folders(root, classes: Sequence[str] | None, known_as: str) -> ImageSet:
    root = _require_dir(root, "data folder")
    names, loose = _class_dirs(root)
    if not names:
        raise DataError(f"{root} has no class folders; expected {root}/<class name>/<images>")

    per_class: dict[str, list[str]] = {}
    skipped: list[Skipped] = []
    for name in names:
        found, bad = _walk_images(os.path.join(root, name))
        per_class[name] = found
        skipped.extend(bad)

    notes: list[str] = []
    if classes is None:
        notes += [f"class '{n}' has no images; left out" for n in names if not per_class[n]]
        class_list = [n for n in names if per_class[n]]
    else:
        class_list = list(classes)
        unknown = [n for n in names if per_class[n] and n not in class_list]
        if unknown:
            raise DataError(
                f"class folder '{unknown[0]}' in {root} is not one of {known_as} "
                f"({', '.join(class_list)}); rename or remove it"
            )
        missing = [n for n in class_list if not per_class.get(n)]
        notes += [f"class '{n}' has no images in {root}" for n in missing]
    if loose:
        notes.append(f"{loose} image file(s) directly in {root} are not in a class folder; ignored")

    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(class_list):
        found = per_class.get(name, [])
        paths.extend(found)
        labels.extend([index] * len(found))
    if not paths:
        raise no_images_error(root, skipped)
    return ImageSet(paths, labels, class_list, skipped, notes)


def resolve_dataset(data) -> tuple[ImageSet, ImageSet | None]:
    """(train, val) for DATA/train + DATA/val, else (DATA as class folders, None).

    Val uses the train classes in the same order, so label indices agree.
    """
    data = _require_dir(data, "data folder")
    train_dir = os.path.join(data, "train")
    val_dir = os.path.join(data, "val")
    has_train, has_val = os.path.isdir(train_dir), os.path.isdir(val_dir)
    if has_train != has_val:
        # A lone train/ (or val/) next to e.g. test/ would otherwise become a class named
        # "train": a model that learns which folder an image came from.
        present, missing = (train_dir, val_dir) if has_train else (val_dir, train_dir)
        raise DataError(
            f"found {present} but no {missing}; add it, or point at the class folders "
            f"directly (e.g. {present})"
        )
    if not has_train:
        return scan_class_folders(data), None
    train = scan_class_folders(train_dir)
    val = _scan_class_folders(val_dir, train.classes, known_as=f"the classes in {train_dir}")
    return train, val


# --- plain inputs (predict) -----------------------------------------------------------------


def scan_inputs(inputs: Sequence) -> ImageSet:
    """Unlabelled images from files and/or folders, in the order given.

    A named file is kept whatever its extension (the user asked for it); inside folders only
    image extensions count. Folder contents are sorted. Each file appears once, at its first
    mention. A single path (str or PathLike) is accepted too.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a bare string would otherwise be scanned one character at a time
    inputs = [os.fspath(i) for i in inputs]
    if not inputs:
        raise DataError("no inputs given; name image files or folders")

    paths: list[str] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()

    def first_time(path: str) -> bool:
        key = os.path.abspath(path)
        if key in seen:
            return False
        seen.add(key)
        return True

    for path in inputs:
        if not os.path.lexists(path):
            raise DataError(f"input {path} does not exist")
        if os.path.isdir(path):
            found, bad = _walk_images(path)
            paths.extend(p for p in found if first_time(p))
            skipped.extend(s for s in bad if first_time(s.path))
        elif first_time(path):
            problem = entry_problem(path)
            if problem:
                skipped.append(Skipped(path, problem))
            else:
                paths.append(path)

    if not paths:
        where = ", ".join(inputs) if len(inputs) <= 3 else f"the {len(inputs)} inputs"
        raise no_images_error(where, skipped)
    return ImageSet(paths, None, [], skipped)


def load_images(
    data: Sequence[str | Path], labels_csv: str | Path | None = None, multi_label: bool = False
) -> ImageSet:
    """Labelled when possible: a labels CSV (of label sets with multi_label), or one folder
    of class sub-folders; otherwise the named files/folders without labels."""
    if labels_csv is not None:
        return read_labels_csv(labels_csv, multi_label=multi_label)
    if len(data) == 1 and Path(data[0]).is_dir() and _has_class_folders(Path(data[0])):
        train, val = resolve_dataset(data[0])
        if val is None:
            return train
        return train.concat(val)
    return scan_inputs(list(data))


def _has_class_folders(root: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
