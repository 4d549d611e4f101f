"""Prediction sets with a coverage guarantee: split-conformal classification.

The nonconformity score of a held-out image is 1 - (its calibrated probability of the
true class). With n such scores and a coverage level 1 - alpha, q is the
ceil((n + 1)(1 - alpha))-th smallest; the set of a new image is every class whose
probability is at least 1 - q (the "least ambiguous set-valued classifier" of Sadinle,
Lei and Wasserman, 2019: the smallest sets on average among conformal methods).

The guarantee: if the held-out images and the new image are exchangeable (drawn the same
way from the same population, in no particular order), the new image's true class is in
its set with probability at least 1 - alpha, on average over images (not for each class
or each image). A set can be empty (no class is plausible enough) or hold several.
With fewer than 1/alpha - 1 held-out images no finite q exists and every set is every
class. The coverage level is chosen at predict time: the sorted scores are stored.
"""

from __future__ import annotations

import math

import numpy as np

from tlearn.core.errors import UsageError

TOLERANCE = 1e-9  # a probability equal to the threshold up to float rounding is in the set


def check_coverage(coverage: float | None) -> float | None:
    if coverage is None:
        return None
    c = float(coverage)
    if not (0.0 < c < 1.0) or not math.isfinite(c):
        raise UsageError(f"--coverage {coverage}: must be between 0 and 1, e.g. 0.9")
    return c


def nonconformity(probabilities: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 - probability of the true class, sorted ascending (float64)."""
    P = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    return np.sort(1.0 - P[np.arange(len(y)), y])


def quantile(scores: np.ndarray, coverage: float) -> float:
    """q for `coverage` from sorted held-out scores: the ceil((n+1) coverage)-th smallest,
    or inf when there are too few scores for that coverage."""
    n = len(scores)
    rank = math.ceil((n + 1) * coverage - 1e-12)
    if rank > n or n == 0:
        return math.inf
    return float(scores[rank - 1])


def max_coverage(n: int) -> float:
    """The highest coverage n held-out scores support with a finite threshold."""
    return n / (n + 1.0)


def prediction_sets(probabilities: np.ndarray, q: float) -> np.ndarray:
    """(n, K) booleans: class k is in image i's set when p_ik >= 1 - q."""
    P = np.asarray(probabilities, dtype=np.float64)
    if math.isinf(q):
        return np.ones(P.shape, dtype=bool)
    return P >= 1.0 - q - TOLERANCE


def set_metrics(sets: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Empirical coverage and mean set size, overall and per true class."""
    y = np.asarray(y, dtype=np.int64)
    hit = sets[np.arange(len(y)), y] if len(y) else np.zeros(0, dtype=bool)
    size = sets.sum(axis=1) if len(y) else np.zeros(0)
    per_class = {}
    for k, name in enumerate(classes):
        rows = y == k
        per_class[name] = {
            "coverage": float(hit[rows].mean()) if rows.any() else None,
            "mean_set_size": float(size[rows].mean()) if rows.any() else None,
            "support": int(rows.sum()),
        }
    return {
        "coverage": float(hit.mean()) if len(y) else None,
        "mean_set_size": float(size.mean()) if len(y) else None,
        "empty_sets": int((size == 0).sum()),
        "per_class": per_class,
    }
