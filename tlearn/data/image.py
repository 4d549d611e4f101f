"""Reading one image robustly: any supported format as an upright RGB image, or an
`ImageLoadError` whose short reason becomes a row of skipped.csv."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlearn.core.errors import ImageLoadError
from tlearn.data.imageset import entry_problem

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

_UNSUPPORTED_REASON = "not a recognised image format (supported: JPEG, PNG, WebP, BMP, TIFF, GIF)"
# The only Pillow plugins an image is opened with: plain raster formats, decoded in this
# process. Others are never tried, whatever the file name says; some start outside
# programs (EPS/PS runs Ghostscript) or parse rarely used formats. (The JPEG plugin also
# opens the MPO JPEGs many cameras write.)
RASTER_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")


# --- loading --------------------------------------------------------------------------------


# The first bytes of each format in RASTER_FORMATS (TIFF: both byte orders; WebP: RIFF
# then WEBP at offset 8): enough to tell a text file or an EPS named .jpg without decoding.
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),
    (0, b"II*\x00"),
    (0, b"MM\x00*"),
    (8, b"WEBP"),
)


def header_problem(path) -> str | None:
    """Why the file's first bytes are not those of a supported raster format (None: they
    are). A cheap check (16 bytes) for scan time, e.g. --strict on stdout; decoding still
    has the last word."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot read ({e.strerror or type(e).__name__})"
    if any(head[at : at + len(sig)] == sig for at, sig in _SIGNATURES):
        return None
    return _UNSUPPORTED_REASON


def load_image(path, *, min_size: int | None = None, content: bytes | None = None) -> Image.Image:
    """Read any supported image as a loaded RGB image, upright, or raise ImageLoadError.

    - Transparency (alpha, palette or colour-key) is composited onto white (`BACKGROUND`).
    - 16-bit and 32-bit grey images are rescaled to 8 bit (see `_high_depth_to_l`).
    - EXIF orientation is applied; an animated image gives its first frame.
    - The format is taken from the content, not the extension, and must be one of
      RASTER_FORMATS: any other (EPS, PSD, ...) is an error, never handed to its plugin.
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
    problem = entry_problem(path) if content is None else None
    if problem:
        raise ImageLoadError(path, problem)
    try:
        # catch_warnings restores the filters on exit, so nothing global changes. It is not
        # thread-safe (filters are per process), so decode in worker processes, not threads.
        # Other Pillow warnings (e.g. odd EXIF) are silenced: the library does not print.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            source = path if content is None else io.BytesIO(content)
            with Image.open(source, formats=RASTER_FORMATS) as img:
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
        raise ImageLoadError(path, _UNSUPPORTED_REASON) from e
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
