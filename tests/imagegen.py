"""Build small awkward and broken image files for tests.

Plain functions, not fixtures: each takes a target path (or folder), writes the file(s) there,
creating parent folders, and returns the path(s) written. Images are tiny so tests stay fast.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (220, 20, 20)
GREEN = (20, 200, 20)
BLUE = (20, 20, 220)
YELLOW = (230, 230, 20)
WHITE = (255, 255, 255)

# Colours of the four quadrants written by make_quadrants (as stored, before any EXIF rotation).
QUADRANTS = {"top_left": RED, "top_right": GREEN, "bottom_left": BLUE, "bottom_right": YELLOW}

# File names that break naive CSV writing, shell quoting or ASCII assumptions.
ODD_NAMES = [
    'straße, "q"; #1.jpg',
    "with space.jpg",
    "it's.png",
    "日本語.png",
    "semi;colon,comma.jpeg",
]


def _target(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_rgb(path, size=(40, 30), color=RED, format: str | None = None, **save) -> Path:
    """A plain RGB image; `format` overrides the extension (e.g. PNG bytes named .jpg)."""
    path = _target(path)
    Image.new("RGB", size, color).save(path, format=format, **save)
    return path


def make_noise(path, size=(64, 64), seed=0, format: str | None = None, **save) -> Path:
    """Random RGB pixels: incompressible, so a cut-off file really misses image data."""
    path = _target(path)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path, format=format, **save)
    return path


def make_quadrants(path, size=(40, 20), orientation: int | None = None, **save) -> Path:
    """Four coloured quadrants (see QUADRANTS), optionally with an EXIF orientation tag."""
    path = _target(path)
    w, h = size
    img = Image.new("RGB", size)
    img.paste(QUADRANTS["top_left"], (0, 0, w // 2, h // 2))
    img.paste(QUADRANTS["top_right"], (w // 2, 0, w, h // 2))
    img.paste(QUADRANTS["bottom_left"], (0, h // 2, w // 2, h))
    img.paste(QUADRANTS["bottom_right"], (w // 2, h // 2, w, h))
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    img.save(path, quality=95, **save)
    return path


def make_gray(path, size=(40, 30), value=128, mode="L") -> Path:
    """A uniform grey image in mode L, or 1 (1-bit: value > 0 is white)."""
    path = _target(path)
    Image.new(mode, size, value if mode != "1" else int(value > 0)).save(path)
    return path


def make_half_transparent(path, mode="RGBA", color=RED) -> Path:
    """40x30: left half fully transparent, right half opaque `color` (grey level for LA).

    mode RGBA or LA: an alpha band; mode P: a palette image whose transparent index is
    stored as tRNS (PNG) or the GIF transparency field.
    """
    path = _target(path)
    size, half = (40, 30), (0, 0, 20, 30)
    if mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, *color] + [0, 0, 0] * 254)
        img.paste(0, half)  # index 0 is black underneath but transparent
        img.save(path, transparency=0)
        return path
    if mode == "RGBA":
        img = Image.new("RGBA", size, (*color, 255))
        img.paste((0, 0, 0, 0), half)  # black with alpha 0
    else:
        img = Image.new("LA", size, (color[0], 255))
        img.paste((0, 0), half)
    img.save(path)
    return path


def make_rgba(path, size=(40, 30), color=RED, alpha=128) -> Path:
    """A uniform RGBA image with one alpha value."""
    path = _target(path)
    Image.new("RGBA", size, (*color, alpha)).save(path)
    return path


def make_cmyk_jpeg(path, size=(40, 30), cmyk=(0, 255, 255, 0)) -> Path:
    """A CMYK JPEG; the default ink (no cyan, full magenta and yellow) is red."""
    path = _target(path)
    Image.new("CMYK", size, cmyk).save(path, format="JPEG", quality=95)
    return path


def make_high_depth(path, size=(40, 30), value=32768, dtype=np.uint16) -> Path:
    """A one-band grey image from a uniform array: uint16 -> mode I;16, int32 -> I,
    float32 -> F. The extension picks the container (.png, .tif)."""
    path = _target(path)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=dtype)).save(path)
    return path


def make_rgb16_png(path, size=(40, 30), value=32768) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    path = _target(path)
    w, h = size
    row = b"\x00" + np.full((w, 3), value, ">u2").tobytes()  # filter byte 0, then pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16-bit, colour type 2 (RGB)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * h))
        + chunk(b"IEND", b"")
    )
    return path


def make_animated_gif(path, size=(40, 30), colors=(RED, BLUE, GREEN)) -> Path:
    """One frame per colour; readers should use the first."""
    path = _target(path)
    frames = [Image.new("RGB", size, c) for c in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def make_truncated(path, keep=0.5, format="JPEG") -> Path:
    """A noise image cut off after `keep` of its bytes (header intact, pixel data missing)."""
    path = make_noise(path, format=format)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_zero_byte(path) -> Path:
    path = _target(path)
    path.write_bytes(b"")
    return path


def make_text_file(path, text="this is not an image\n") -> Path:
    path = _target(path)
    path.write_text(text)
    return path


def make_random_bytes(path, n=2048, seed=0) -> Path:
    path = _target(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes())
    return path


def make_broken_symlink(path) -> Path:
    """A symlink to a file that does not exist."""
    path = _target(path)
    os.symlink(path.parent / "no-such-target.jpg", path)
    return path


def make_dir_named_like_image(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True)
    return path


def make_class_folders(root, counts: dict[str, int], size=(40, 30)) -> dict[str, list[str]]:
    """root/<class>/img_<i>.png for each class; returns class -> sorted str paths."""
    colors = [RED, GREEN, BLUE, YELLOW]
    out: dict[str, list[str]] = {}
    for k, (name, n) in enumerate(counts.items()):
        out[name] = [
            str(make_rgb(Path(root) / name / f"img_{i}.png", size, colors[k % 4])) for i in range(n)
        ]
    return out


def _sorted_paths(paths) -> list[str]:
    # The order the scanners promise: by path components, so a folder's contents stay together.
    return [str(p) for p in sorted(paths, key=lambda p: Path(p).parts)]


def make_messy_folder(root) -> dict:
    """A class-folder tree with most real-world mess; returns what a scan should find.

    Keys: classes (sorted usable classes), images (class -> paths a scan keeps, in scan
    order), skipped (path -> reason from the cheap scan), unreadable (path -> reason fragment
    from load_image: kept by scanning, only decoding finds them), ignored (files a scan must
    not report at all), empty_classes.
    """
    root = Path(root)
    cat, dog = root / "cat", root / "dog"
    images = {
        "cat": [
            make_rgb(cat / "a.jpg"),
            make_rgb(cat / "UPPER.JPG"),
            make_rgb(cat / "Mixed.PnG", format="PNG"),
            make_rgb(cat / ODD_NAMES[0]),
            make_rgb(cat / "sub" / "deeper" / "nested.png"),
        ],
        "dog": [
            make_rgb(dog / "x.png", color=BLUE),
            make_rgb(dog / "y.webp", color=BLUE),
            make_rgb(dog / "png-named.jpg", color=BLUE, format="PNG"),
            make_truncated(dog / "truncated.jpg"),
            make_text_file(dog / "text.jpg"),
        ],
    }
    unreadable = {
        str(dog / "truncated.jpg"): "truncated",
        str(dog / "text.jpg"): "not a recognised image format",
    }
    skipped = {
        str(make_zero_byte(cat / "zero.jpg")): "zero-byte file",
        str(make_broken_symlink(dog / "broken.jpg")): "broken symlink",
        str(make_dir_named_like_image(dog / "folder.jpg")): "is a directory",
    }
    ignored = [
        make_random_bytes(cat / ".DS_Store"),
        make_random_bytes(cat / "._a.jpg"),  # macOS resource fork: hidden, not an image
        make_text_file(cat / "notes.txt"),
        make_text_file(dog / "labels.csv", "path,label\n"),
        make_rgb(dog / ".hidden" / "secret.jpg"),
        make_rgb(root / ".git" / "objects" / "blob.jpg"),
        make_text_file(root / "empty" / "readme.txt"),
    ]
    return {
        "classes": ["cat", "dog"],
        "images": {name: _sorted_paths(paths) for name, paths in images.items()},
        "skipped": skipped,
        "unreadable": unreadable,
        "ignored": [str(p) for p in ignored],
        "empty_classes": ["empty"],
    }
