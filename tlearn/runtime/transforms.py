"""Preprocessing, resolved in one place from the data config saved with the model.

The data config is timm's resolved pretrained config of the backbone (input size,
interpolation, mean/std, crop). `fit` stores it in the model directory and `predict`
rebuilds exactly the same transform from it.
"""

from __future__ import annotations

import numpy as np

from tlearn.data.pixels import AspectGuard, describe, resize_target


def eval_transform(data_config: dict):
    """timm's eval transform: resize the shorter side to size / crop_pct, centre crop.
    Its Resize + CenterCrop are done by data.pixels.PilSteps when they describe them (the
    same pixels, and no huge resized image in between for an extreme aspect ratio); any
    other transform first refuses images whose resized copy would be too big."""
    t = timm_eval_transform(data_config)
    steps = list(t.transforms)
    pil = describe(steps[:2]) if len(steps) > 2 else None
    if pil is not None:
        t.transforms = [pil.apply, *steps[2:]]
    else:
        t.transforms = [AspectGuard(resize_target(data_config)), *steps]
    return t


def timm_eval_transform(data_config: dict):
    """timm's eval transform exactly as timm builds it."""
    # timm (and torch) only for the transform itself: warm runs use data.pixels
    import timm.data

    return timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
        is_training=False,
    )


class PixelTransform:
    """The PIL steps of the eval transform, returning uint8 HWC pixels as a tensor."""

    def __init__(self, pil_steps):
        self.pil_steps = pil_steps

    def __call__(self, img):
        # torch only for the transform itself: warm runs use data.pixels
        import torch

        for step in self.pil_steps:
            img = step(img)
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


def split_eval_transform(data_config: dict):
    """(pixel transform, mean, std) when the eval transform is PIL steps followed by
    ToTensor and Normalize, else None.

    Decoding workers can then stop at uint8 pixels (4x less data, and no float work per
    image) and the runtime finishes the batch with the same float32 arithmetic as
    ToTensor + Normalize: x / 255, then (x - mean) / std, so the features do not change."""
    steps = list(timm_eval_transform(data_config).transforms)
    if len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2:]
    if type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    if type(normalize).__name__ != "Normalize" or getattr(normalize, "inplace", False):
        return None
    if any(type(s).__name__.endswith(("Tensor", "Normalize")) for s in steps[:-2]):
        return None
    mean = [float(v) for v in _as_list(normalize.mean)]
    std = [float(v) for v in _as_list(normalize.std)]
    if len(mean) != 3 or len(std) != 3 or data_config["input_size"][0] != 3:
        return None

    # Plain PIL steps when they are the usual Resize + CenterCrop: no torch in workers,
    # and a description the cache can keep (tlearn.warm).
    pil = describe(steps[:-2])
    if pil is None:
        return PixelTransform([AspectGuard(resize_target(data_config)), *steps[:-2]]), mean, std
    return pil, mean, std


def _as_list(v) -> list:
    return v.tolist() if hasattr(v, "tolist") else list(v)


def pixel_path(data_config: dict):
    """(PixelTransform or PilSteps, mean, std), or None when the transform does not split
    into PIL steps + ToTensor + Normalize."""
    return split_eval_transform(data_config)
