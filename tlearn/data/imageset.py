"""What a scan finds: image paths in a fixed order with optional labels (`ImageSet`),
the files left out and why (`Skipped`), and the metadata checks that decide it."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlearn.core.errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


@dataclass(frozen=True)
class Skipped:
    """A file that was left out, and why (one row of skipped.csv)."""

    path: str
    reason: str


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
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symlink" if os.path.islink(path) else "file not found"
    except OSError as e:
        return f"cannot access ({e.strerror or type(e).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or stream forever when opened.
        return "not a regular file"
    if st.st_size == 0:
        return "zero-byte file"
    return None


def no_images_error(where: str, skipped: list[Skipped]) -> DataError:
    if not skipped:
        return DataError(f"no image files found in {where}")
    first = skipped[0]
    return DataError(
        f"no readable image files in {where}: {len(skipped)} skipped "
        f"(first: {first.path}: {first.reason})"
    )
