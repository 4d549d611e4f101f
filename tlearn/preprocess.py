"""Preprocessing, resolved in one place from the data config saved with the model.

The data config is timm's resolved pretrained config of the backbone (input size,
interpolation, mean/std, crop). `fit` stores it in the model directory and `predict`
rebuilds exactly the same transform from it.
"""

from __future__ import annotations

import math

import timm.data


def eval_transform(data_config: dict):
    """timm's eval transform: resize the shorter side to size / crop_pct, centre crop."""
    return timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
        is_training=False,
    )


def resize_target(data_config: dict) -> int:
    """The shorter-side length the eval transform resizes to. A JPEG may be decoded at a
    reduced scale as long as its shorter side stays at least this long."""
    size = max(data_config["input_size"][1:])
    return int(math.floor(size / data_config["crop_pct"]))
