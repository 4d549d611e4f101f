"""Holding out a validation split (--val-split): one rule for features and images alike."""

from __future__ import annotations

import numpy as np

from tlearn.core.errors import DataError, UsageError


def check_val_split(fraction: float) -> float:
    """--val-split must leave images on both sides."""
    if not 0 < fraction < 1:
        raise UsageError(f"--val-split {fraction}: must be between 0 and 1, e.g. 0.2")
    return fraction


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), each sorted: a `fraction` of the images held
    out, stratified by label when every class has at least two images."""
    # only when a split is asked for
    from sklearn.model_selection import train_test_split

    check_val_split(fraction)
    y = np.asarray(labels)
    idx = np.arange(len(y))
    counts = np.bincount(y) if len(y) else np.zeros(0, np.int64)
    stratify = y if len(y) and counts[counts > 0].min() >= 2 else None
    try:
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as e:
        raise DataError(f"--val-split {fraction}: cannot split {len(idx)} images ({e})") from None
    return np.sort(tr), np.sort(va)
