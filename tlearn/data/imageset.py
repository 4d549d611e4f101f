"""What a scan finds: image paths in a fixed order with optional labels (`ImageSet`),
the files left out and why (`Skipped`), and the metadata checks that decide it."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlearn.core.errors import DataError, NothingReadError
from tlearn.core.names import NOT_UTF8, is_utf8, printable

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


@dataclass(frozen=True)
class Skipped:
    """A file that was left out, and why (one row of skipped.csv)."""

    path: str
    reason: str

    def __post_init__(self) -> None:
        # The list is written as UTF-8 text: a name that is not UTF-8 is shown escaped.
        object.__setattr__(self, "path", printable(self.path))


@dataclass
class ImageSet:
    """Image paths in a fixed order, with optional labels (indices into `classes`)."""

    paths: list[str]
    labels: list[int] | None
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A length mismatch would silently pair images with the wrong labels later on.
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def concat(self, other: ImageSet) -> ImageSet:
        """Both sets of images, in order (same class list: e.g. train + val folders)."""
        return ImageSet(
            paths=self.paths + other.paths,
            labels=(self.labels or []) + (other.labels or []),
            classes=self.classes,
            skipped=self.skipped + other.skipped,
            warnings=self.warnings + other.warnings,
        )

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The selected images; classes, skipped and warnings are kept (copied)."""
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return ImageSet(
            paths=[self.paths[i] for i in indices],
            labels=labels,
            classes=list(self.classes),
            skipped=list(self.skipped),
            warnings=list(self.warnings),
        )

    @property
    def label_names(self) -> list[str | None]:
        if self.labels is None:
            return [None] * len(self.paths)
        return [self.classes[i] for i in self.labels]


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image extension (any case).

    Hidden names are out: .DS_Store, and macOS '._photo.jpg' resource forks that look like
    images but are not.
    """
    base = os.path.basename(name)
    if not base or base.startswith("."):
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


# --- scanning -------------------------------------------------------------------------------


def entry_problem(path: str) -> str | None:
    """Why `path` cannot be an image file, from metadata alone (no decoding); None if fine."""
    return entry_stat(path)[1]


def entry_stat(path: str) -> tuple[os.stat_result | None, str | None]:
    """(os.stat of the file symlinks lead to, None) for a usable file, else (None, why not)."""
    if not is_utf8(path):  # its name could not be written to any output (see core.names)
        return None, NOT_UTF8
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "broken symlink" if os.path.islink(path) else "file not found"
    except OSError as e:
        return None, f"cannot access ({e.strerror or type(e).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return None, "is a directory"
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or stream forever when opened.
        return None, "not a regular file"
    if st.st_size == 0:
        return None, "zero-byte file"
    return st, None


class SeenFiles:
    """Each real file once across a whole dataset, by (st_dev, st_ino): a file reached again
    through a symlink (to it or to a folder above it) or a hard link is not a new image.
    Again under the same label (or unlabelled): counted once, with a note. Under another
    label: a DataError, since one file cannot be an example of two classes."""

    def __init__(self) -> None:
        self.first: dict[tuple[int, int], tuple[str, str | None]] = {}
        self.again: list[tuple[str, str]] = []  # (path, the path it was first seen as)
        self.conflicts: list[tuple[str, str, str, str]] = []  # (path, label, first, label)

    def claim(self, path: str, st: os.stat_result, label: str | None = None) -> bool:
        """True the first time this real file is seen."""
        key = (st.st_dev, st.st_ino)
        first = self.first.get(key)
        if first is None:
            self.first[key] = (path, label)
            return True
        if os.path.abspath(first[0]) == os.path.abspath(path):
            return False  # the same name twice (e.g. named twice on the command line)
        if first[1] == label:
            self.again.append((path, first[0]))
        else:
            self.conflicts.append((path, str(label), first[0], str(first[1])))
        return False

    def check(self) -> list[str]:
        """Notes on files counted once; DataError for a file under two labels."""
        if self.conflicts:
            path, label, first, first_label = self.conflicts[0]
            more = len(self.conflicts) - 1
            also = f" (and {more} more such file(s))" if more else ""
            raise DataError(
                f"{path} (class '{label}') is the same file as {first} (class "
                f"'{first_label}') through a symlink or hard link{also}; one file cannot "
                "have two labels: remove the link or the copy"
            )
        if not self.again:
            return []
        path, first = self.again[0]
        return [
            f"{len(self.again)} file(s) reached a second time through a symlink or hard link "
            f"were counted once (e.g. {path} is {first})"
        ]


def no_images_error(where: str, skipped: list[Skipped]) -> DataError:
    """No image to use: none found (exit 1), or every one skipped (NothingReadError, 3)."""
    if not skipped:
        return DataError(f"no image files found in {where}")
    return NothingReadError(where, skipped)
