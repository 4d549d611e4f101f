"""The PIL half of the eval transform, as plain values and without torch.

timm's eval transform for almost every model is torchvision's Resize(shorter side) +
CenterCrop, then ToTensor + Normalize. `PilSteps` does the first two exactly as
torchvision does them on PIL images (same output size rule, same Pillow resample call,
same crop rounding and zero padding; tested pixel for pixel against timm's transform), so
decoding workers need neither torch nor torchvision, and a description of the steps can
be remembered in the cache for runs that never import them. ToTensor + Normalize happen
in the runtime (see tlearn.runtime.PixelInput).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# torchvision's InterpolationMode values -> Pillow resample filters (pil_modes_mapping)
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


# The most pixels a resized image may have before it is centre-cropped (~12 MB in RGB):
# ordinary photos stay far below (a 4:1 panorama resized to 256 is 0.26 M); past it only
# the part the crop keeps is resized (`resize_cropped`).
MAX_INTERMEDIATE_PIXELS = 1 << 22


@dataclass(frozen=True)
class PilSteps:
    """Resize (the shorter side to `resize[0]`, or to exactly (h, w)), then centre crop to
    `crop` (h, w); returns uint8 HWC pixels."""

    resize: tuple[int, ...]  # (shorter side,) or (h, w)
    interpolation: str  # a key of RESAMPLE
    crop: tuple[int, int]  # (h, w)
    max_size: int | None = None

    def to_dict(self) -> dict:
        return {
            "resize": list(self.resize),
            "interpolation": self.interpolation,
            "crop": list(self.crop),
            "max_size": self.max_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PilSteps:
        return cls(
            resize=tuple(int(v) for v in d["resize"]),
            interpolation=str(d["interpolation"]),
            crop=(int(d["crop"][0]), int(d["crop"][1])),
            max_size=None if d.get("max_size") is None else int(d["max_size"]),
        )

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) after the resize: torchvision's _compute_resized_output_size."""
        if len(self.resize) == 2:
            return self.resize[0], self.resize[1]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_h, new_w

    def apply(self, img: Image.Image) -> Image.Image:
        h, w = self.output_size(img.width, img.height)
        if (img.height, img.width) == (h, w):  # torchvision returns the image unchanged
            return center_crop(img, self.crop)
        resample = RESAMPLE[self.interpolation]
        if h * w <= MAX_INTERMEDIATE_PIXELS:
            return center_crop(img.resize((w, h), resample), self.crop)
        # An extreme aspect ratio (a 20000x1 strip resized to a shorter side of 256 would be
        # 5 million pixels long): resize only the window the crop keeps.
        return resize_cropped(img, (h, w), self.crop, resample)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return np.array(self.apply(img), dtype=np.uint8, copy=True)


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's center_crop on a PIL image: zero padding where the image is smaller,
    offsets rounded half to even (Python's round)."""
    crop_h, crop_w = size
    if crop_w > img.width or crop_h > img.height:
        left = (crop_w - img.width) // 2 if crop_w > img.width else 0
        top = (crop_h - img.height) // 2 if crop_h > img.height else 0
        right = (crop_w - img.width + 1) // 2 if crop_w > img.width else 0
        bottom = (crop_h - img.height + 1) // 2 if crop_h > img.height else 0
        padded = Image.new(img.mode, (img.width + left + right, img.height + top + bottom), 0)
        padded.paste(img, (left, top))
        img = padded
        if (img.width, img.height) == (crop_w, crop_h):
            return img
    top = int(round((img.height - crop_h) / 2.0))
    left = int(round((img.width - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


# Pillow's filter supports (in source pixels at scale 1), for the rows a resize reads.
_SUPPORT = {
    Image.Resampling.NEAREST: 1.0,
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}


def resize_cropped(
    img: Image.Image, size: tuple[int, int], crop: tuple[int, int], resample
) -> Image.Image:
    """center_crop(img.resize(size), crop) without the whole resized image in between:
    only the source under the crop window is resized (Pillow's `box`: the same filter
    positions and weights), zero padding where the crop is larger than the resized image.
    Memory is bounded by the crop and the source, whatever the aspect ratio.

    Pillow resizes a whole image horizontally, then vertically, rounding to 8 bits in
    between; a box resize may take the other order. So the two passes are made one at a
    time, the horizontal one over just the rows the vertical one reads. The picture is the
    same; single pixels may differ slightly (Pillow may choose the other pass order for the
    whole image, and nearest may pick a neighbouring pixel)."""
    (h, w), (crop_h, crop_w) = size, crop

    def window(n: int, c: int) -> tuple[int, int, int]:
        # (first resized pixel kept, how many, offset in the output): center_crop's rules
        if c > n:
            return 0, n, (c - n) // 2
        return int(round((n - c) / 2.0)), c, 0

    y0, hh, oy = window(h, crop_h)
    x0, ww, ox = window(w, crop_w)
    sx, sy = img.width / w, img.height / h
    top, bottom = y0 * sy, (y0 + hh) * sy
    margin = math.ceil(_SUPPORT.get(resample, 3.0) * max(sy, 1.0)) + 1
    r0 = max(0, math.floor(top) - margin)
    r1 = min(img.height, math.ceil(bottom) + margin)
    rows = img.crop((0, r0, img.width, r1))
    if w == img.width:
        part = rows.crop((x0, 0, x0 + ww, r1 - r0))
    else:
        part = rows.resize((ww, r1 - r0), resample, box=(x0 * sx, 0, (x0 + ww) * sx, r1 - r0))
    if h == img.height:
        part = part.crop((0, y0 - r0, ww, y0 - r0 + hh))
    else:
        part = part.resize((ww, hh), resample, box=(0, top - r0, ww, bottom - r0))
    if (ww, hh) == (crop_w, crop_h):
        return part
    out = Image.new(img.mode, (crop_w, crop_h), 0)
    out.paste(part, (ox, oy))
    return out


class AspectGuard:
    """A first step for eval transforms that are not PilSteps (they resize the whole image):
    refuses an image whose resized copy (shorter side to `shorter`) would be over
    MAX_INTERMEDIATE_PIXELS, instead of allocating it. The image is then skipped."""

    def __init__(self, shorter: int):
        self.shorter = shorter

    def __call__(self, img: Image.Image) -> Image.Image:
        short, long = sorted(img.size)
        pixels = self.shorter * math.ceil(self.shorter * long / max(short, 1))
        if pixels > MAX_INTERMEDIATE_PIXELS:
            raise ValueError(
                f"aspect ratio too extreme ({img.width}x{img.height}): resizing it would "
                f"take {pixels} pixels, over the limit of {MAX_INTERMEDIATE_PIXELS}"
            )
        return img


def describe(steps) -> PilSteps | None:
    """PilSteps for torchvision transforms [Resize, CenterCrop], or None for anything else
    (then the caller keeps the torchvision transforms themselves)."""
    if len(steps) != 2:
        return None
    resize, crop = steps
    if type(resize).__name__ != "Resize" or type(crop).__name__ != "CenterCrop":
        return None
    mode = getattr(getattr(resize, "interpolation", None), "value", None)
    if mode not in RESAMPLE:
        return None
    size = resize.size
    size = (size,) if isinstance(size, int) else tuple(int(v) for v in size)
    csize = crop.size
    csize = (csize, csize) if isinstance(csize, int) else tuple(int(v) for v in csize)
    if len(size) not in (1, 2) or len(csize) == 1:
        csize = (csize[0], csize[0])
    if len(csize) != 2 or (len(size) == 2 and resize.max_size is not None):
        return None
    return PilSteps(resize=size, interpolation=mode, crop=csize, max_size=resize.max_size)


def resize_target(data_config: dict) -> int:
    """The shorter-side length the eval transform resizes to. A JPEG may be decoded at a
    reduced scale as long as its shorter side stays at least this long."""
    size = max(data_config["input_size"][1:])
    return int(math.floor(size / data_config["crop_pct"]))
