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
from tlearn.data.imageset import (
    ImageSet,
    SeenFiles,
    Skipped,
    entry_stat,
    is_image_name,
    no_images_error,
)
from tlearn.data.labels import read_labels_csv


def _walk_images(
    folder: str, seen: SeenFiles | None = None, label: str | None = None
) -> tuple[list[str], list[Skipped]]:
    """Image files under `folder` (recursive, sorted by path components) and the skipped ones.

    Hidden entries and files without an image extension are ignored silently. Symlinked
    folders are followed, each real folder once, so a symlink loop cannot hang the scan.
    With `seen`, a file already seen (under any name) is left to `seen` to report.
    The walk keeps its own stack: folders nested thousands deep are no problem.
    """
    found: list[str] = []
    skipped: list[Skipped] = []
    visited: set[tuple[int, int]] = set()
    seen = seen if seen is not None else SeenFiles()
    stack: list = []  # iterators over the sorted entries of the folders being walked

    def enter(directory: str) -> None:
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
        stack.append(iter(entries))

    enter(folder)
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry.name.startswith("."):
            continue
        elif is_image_name(entry.name):
            st, problem = entry_stat(entry.path)
            if problem:
                skipped.append(Skipped(entry.path, problem))
            elif seen.claim(entry.path, st, label):
                found.append(entry.path)
        elif _is_dir(entry):
            enter(entry.path)
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


def _scan_class_folders(
    root, classes: Sequence[str] | None, known_as: str, seen: SeenFiles | None = None
) -> ImageSet:
    root = _require_dir(root, "data folder")
    own = seen is None  # else the caller checks `seen` once the whole dataset is scanned
    seen = SeenFiles() if own else seen
    names, loose = _class_dirs(root)
    if not names:
        raise DataError(f"{root} has no class folders; expected {root}/<class name>/<images>")

    per_class: dict[str, list[str]] = {}
    skipped: list[Skipped] = []
    for name in names:
        found, bad = _walk_images(os.path.join(root, name), seen, name)
        per_class[name] = found
        skipped.extend(bad)

    notes: list[str] = seen.check() if own else []
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
    seen = SeenFiles()  # a file in train/ and val/ (a link) is counted once, in train
    train = _scan_class_folders(train_dir, None, "the known classes", seen)
    known_as = f"the classes in {train_dir}"
    val = _scan_class_folders(val_dir, train.classes, known_as, seen)
    train.warnings.extend(seen.check())
    return train, val


# --- plain inputs (predict) -----------------------------------------------------------------


def scan_inputs(inputs: Sequence) -> ImageSet:
    """Unlabelled images from files and/or folders, in the order given.

    A named file is kept whatever its extension (the user asked for it); inside folders only
    image extensions count. Folder contents are sorted. Each file appears once, at its first
    mention (also when named again through a symlink or hard link; then with a note). A
    single path (str or PathLike) is accepted too.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a bare string would otherwise be scanned one character at a time
    inputs = [os.fspath(i) for i in inputs]
    if not inputs:
        raise DataError("no inputs given; name image files or folders")

    paths: list[str] = []
    skipped: list[Skipped] = []
    seen = SeenFiles()
    named: set[str] = set()  # skipped files, each listed once

    def skip(path: str, problem: str) -> None:
        if os.path.abspath(path) not in named:
            named.add(os.path.abspath(path))
            skipped.append(Skipped(path, problem))

    for path in inputs:
        if not os.path.lexists(path):
            raise DataError(f"input {path} does not exist")
        if os.path.isdir(path):
            found, bad = _walk_images(path, seen)
            paths.extend(found)
            for s in bad:
                skip(s.path, s.reason)
            continue
        st, problem = entry_stat(path)
        if problem:
            skip(path, problem)
        elif seen.claim(path, st):
            paths.append(path)

    if not paths:
        where = ", ".join(inputs) if len(inputs) <= 3 else f"the {len(inputs)} inputs"
        raise no_images_error(where, skipped)
    return ImageSet(paths, None, [], skipped, seen.check())


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


def has_split_folders(data) -> bool:
    """DATA has train/ and val/ sub-folders (resolve_dataset's layout with a val set)."""
    root = Path(data)
    return (root / "train").is_dir() and (root / "val").is_dir()
