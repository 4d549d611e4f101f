"""Find images (class folders, label CSVs, plain inputs) and read them robustly.

Scanning is cheap: it walks folders and looks at names and file metadata only, so a folder of
a million images scans in seconds. Anything that needs decoding is found by `load_image`, which
the feature extractor calls once per image (in worker processes) and whose `ImageLoadError`
becomes one row of skipped.csv.

No torch here, and no printing: problems come back as `Skipped` entries and warning strings.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlearn.core.errors import DataError, ImageLoadError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Transparent pixels are composited onto white: a fixed, documented choice that matches how
# the images look in a browser or file viewer, and keeps the result independent of whatever
# colour values happen to sit under alpha 0.
BACKGROUND = (255, 255, 255)

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (same table as
# PIL.ImageOps.exif_transpose, applied to our converted copy to avoid one more copy).
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BOMB_REASON = "over Pillow's pixel limit (decompression bomb)"


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


def _entry_problem(path: str) -> str | None:
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
                problem = _entry_problem(entry.path)
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


def _no_images_error(where: str, skipped: list[Skipped]) -> DataError:
    if not skipped:
        return DataError(f"no image files found in {where}")
    first = skipped[0]
    return DataError(
        f"no readable image files in {where}: {len(skipped)} skipped "
        f"(first: {first.path}: {first.reason})"
    )


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
        raise _no_images_error(root, skipped)
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


def read_labels_csv(csv_path, classes: Sequence[str] | None = None) -> ImageSet:
    """Images and labels from a CSV with a `path,label` header (other columns ignored).

    Relative paths are resolved against the CSV's folder. Rows keep the file's order. Files
    that exist but are unusable from their metadata (zero bytes, broken symlink) become
    `Skipped`; every other problem is a DataError naming the line. Classes default to the
    sorted unique labels of the usable rows.
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
    for line, row in rows[1:]:
        where = f"{csv_path}: line {line}"
        path, label = _csv_entry(row, columns, base, where, classes)
        key = os.path.abspath(path)
        if key in first_line:
            raise DataError(f"{where}: duplicate path {path} (first on line {first_line[key]})")
        first_line[key] = line
        problem = _entry_problem(path)
        if problem:
            skipped.append(Skipped(path, problem))
            lost.append(label)
        else:
            paths.append(path)
            names.append(label)

    if not paths:
        raise _no_images_error(csv_path, skipped)
    used = set(names)
    if classes is None:
        class_list = sorted(used)
        notes = [f"class '{c}' has no usable images; left out" for c in sorted(set(lost) - used)]
    else:
        class_list = list(classes)
        notes = [f"class '{c}' has no images in {csv_path}" for c in class_list if c not in used]
    index = {name: i for i, name in enumerate(class_list)}
    return ImageSet(paths, [index[n] for n in names], class_list, skipped, notes)


def _csv_entry(
    row: list[str], columns: tuple[int, int], base: str, where: str, classes
) -> tuple[str, str]:
    """(resolved path, label) of one data row; DataError for anything the user must fix."""
    path_col, label_col = columns
    need = max(columns) + 1
    if len(row) < need:
        raise DataError(f"{where}: expected at least {need} columns, got {len(row)}")
    raw_path, label = row[path_col].strip(), row[label_col].strip()
    if not raw_path:
        raise DataError(f"{where}: empty path")
    if not label:
        raise DataError(f"{where}: empty label for {raw_path}")
    if classes is not None and label not in classes:
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
            problem = _entry_problem(path)
            if problem:
                skipped.append(Skipped(path, problem))
            else:
                paths.append(path)

    if not paths:
        where = ", ".join(inputs) if len(inputs) <= 3 else f"the {len(inputs)} inputs"
        raise _no_images_error(where, skipped)
    return ImageSet(paths, None, [], skipped)


# --- loading --------------------------------------------------------------------------------


def load_image(path, *, min_size: int | None = None, content: bytes | None = None) -> Image.Image:
    """Read any supported image as a loaded RGB image, upright, or raise ImageLoadError.

    - Transparency (alpha, palette or colour-key) is composited onto white (`BACKGROUND`).
    - 16-bit and 32-bit grey images are rescaled to 8 bit (see `_high_depth_to_l`).
    - EXIF orientation is applied; an animated image gives its first frame.
    - The format is taken from the content, not the extension.
    - `min_size`: let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while both sides stay
      >= min_size, which makes big photos much cheaper to read. Other formats load in full.
    - `content`: the file's bytes, already read (e.g. to hash them for the feature cache);
      decoded instead of opening `path`, which then only names the image in errors.

    Truncated files are errors (ImageFile.LOAD_TRUNCATED_IMAGES is not touched), and so are
    images over Pillow's pixel limit, including the warning zone below twice the limit.
    """
    if min_size is not None and min_size < 1:
        raise ValueError(f"min_size must be a positive number of pixels, got {min_size}")
    path = os.fspath(path)
    problem = _entry_problem(path) if content is None else None
    if problem:
        raise ImageLoadError(path, problem)
    try:
        # catch_warnings restores the filters on exit, so nothing global changes. It is not
        # thread-safe (filters are per process), so decode in worker processes, not threads.
        # Other Pillow warnings (e.g. odd EXIF) are silenced: the library does not print.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if content is None else io.BytesIO(content)) as img:
                if min_size is not None:
                    img.draft("RGB", (min_size, min_size))  # a no-op for non-JPEG formats
                img.load()  # decode now, inside the try, so lazy decode errors surface here
                orientation = _exif_orientation(img)
                rgb = _to_rgb(img, path)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, _BOMB_REASON) from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not a recognised image format") from e
    except PermissionError as e:
        raise ImageLoadError(path, "permission denied") from e
    except Exception as e:
        # Pillow's plugins raise many types on damaged data (OSError, SyntaxError, ValueError,
        # struct.error, EOFError...); each one means this file cannot be used.
        raise ImageLoadError(path, f"truncated or corrupt image ({_describe(e)})") from e
    op = _ORIENTATION_OPS.get(orientation)
    return rgb.transpose(op) if op is not None else rgb


def _describe(e: BaseException, limit: int = 120) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:
        return 1  # malformed EXIF must not cost an image whose pixels decoded fine


def _has_transparency(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.mode or "transparency" in img.info


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """A new RGB image (never `img` itself: that one dies when its file is closed)."""
    try:
        if img.mode.startswith("I") or img.mode == "F":
            return _high_depth_to_l(img).convert("RGB")
        if _has_transparency(img):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageLoadError(path, f"unsupported image mode {img.mode} ({_describe(e)})") from e


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grey image to 8 bit.

    Pillow's own convert() clips these to 0..255, which turns a mid-grey 16-bit image
    white. Instead the values are divided by their container's full scale: 65535 for 16-bit
    modes; for I/F the full scale is inferred from the value range (<= 1 for floats, <= 255,
    <= 65535), and only data outside all of these is stretched min..max.
    """
    values = np.nan_to_num(np.asarray(img).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    full = _full_scale(img.mode, values)
    if full is None:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        values = values / full
    return Image.fromarray(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8))


def _full_scale(mode: str, values: np.ndarray) -> float | None:
    if mode.startswith("I;16"):
        return 65535.0
    if values.size == 0:
        return 255.0
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        return None
    if mode == "F" and hi <= 1.0:
        return 1.0
    if hi <= 255:
        return 255.0
    if hi <= 65535:
        return 65535.0
    return None
