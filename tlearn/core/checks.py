"""Checks for values read back from files (a model's config.json, its data config): every
field's type and every number's range, so a damaged or hostile file gives one line naming
the file and the field, never a KeyError/TypeError deep inside a run or NaN scores."""

from __future__ import annotations

import math

from tlearn.core.errors import ArtifactError
from tlearn.core.spec import POOLS

MIN_INPUT_SIDE, MAX_INPUT_SIDE = 8, 4096  # pixels of the network's input
MAX_RESIZE_SIDE = 8192  # input side / crop_pct: the resize before the centre crop
MAX_MEAN, MIN_STD, MAX_STD = 100.0, 1e-6, 100.0  # normalisation on 0..1 pixels
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
MAX_FEATURE_DIM = 50_000_000
MAX_HIDDEN = 1_000_000


def shown(value) -> str:
    """A short repr of a value read from a file (never more than ~60 characters)."""
    try:
        text = repr(value)
    except RecursionError:
        return type(value).__name__
    return text if len(text) <= 60 else f"{text[:57]}..."


def need(ok: bool, where, field: str, what: str, value) -> None:
    """ArtifactError "<file>: '<field>' must be <what>, got <value>" unless `ok`."""
    if not ok:
        raise ArtifactError(f"{where}: '{field}' must be {what}, got {shown(value)}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def check_data_config(dc, where, field: str = "data_config") -> None:
    """The preprocessing a model was fitted with: input size, interpolation, mean/std,
    crop. Everything predict derives from it must be sane before an image is opened."""
    need(isinstance(dc, dict), where, field, "an object", dc)
    for key in ("input_size", "interpolation", "mean", "std", "crop_pct"):
        if key not in dc:
            raise ArtifactError(f"{where}: '{field}' is missing {key!r}")
    size = dc["input_size"]
    need(
        isinstance(size, list) and len(size) == 3 and all(is_int(v) for v in size),
        where,
        f"{field}.input_size",
        "a list of 3 integers [channels, height, width]",
        size,
    )
    c, h, w = size
    need(c in (1, 3), where, f"{field}.input_size", "1 or 3 channels", size)
    need(
        MIN_INPUT_SIDE <= min(h, w) and max(h, w) <= MAX_INPUT_SIDE,
        where,
        f"{field}.input_size",
        f"a height and width from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE} pixels",
        size,
    )
    interp = dc["interpolation"]
    need(
        interp in INTERPOLATIONS,
        where,
        f"{field}.interpolation",
        f"one of {INTERPOLATIONS}",
        interp,
    )
    for key, low, high in (("mean", -MAX_MEAN, MAX_MEAN), ("std", MIN_STD, MAX_STD)):
        v = dc[key]
        need(
            isinstance(v, list)
            and len(v) == c
            and all(is_number(x) and low <= x <= high for x in v),
            where,
            f"{field}.{key}",
            f"a list of {c} finite numbers from {low:g} to {high:g}",
            v,
        )
    crop = dc["crop_pct"]
    need(
        is_number(crop) and 0 < crop <= 1, where, f"{field}.crop_pct", "above 0 and at most 1", crop
    )
    need(
        max(h, w) / crop <= MAX_RESIZE_SIDE,
        where,
        f"{field}.crop_pct",
        f"large enough that input size / crop_pct is at most {MAX_RESIZE_SIDE} pixels",
        crop,
    )
    mode = dc.get("crop_mode", "center")
    need(mode in CROP_MODES, where, f"{field}.crop_mode", f"one of {CROP_MODES}", mode)


def check_cut(cut, where) -> None:
    """The cut's fields (CutSpec.from_dict) by type."""
    need(isinstance(cut, dict), where, "cut", "an object", cut)
    for key in ("model", "weights_source", "layers", "pool"):
        if key not in cut:
            raise ArtifactError(f"{where}: 'cut' is missing {key!r}")
    need(isinstance(cut["model"], str) and cut["model"], where, "cut.model", "a name", cut["model"])
    src = cut["weights_source"]
    need(isinstance(src, str), where, "cut.weights_source", "a string", src)
    sha = cut.get("weights_sha256")
    need(sha is None or isinstance(sha, str), where, "cut.weights_sha256", "a string", sha)
    layers = cut["layers"]
    need(
        isinstance(layers, list) and layers and all(isinstance(x, str) and x for x in layers),
        where,
        "cut.layers",
        "a list of layer names",
        layers,
    )
    need(cut["pool"] in POOLS, where, "cut.pool", f"one of {POOLS}", cut["pool"])
