"""How good a model's probabilities are on labelled images: expected calibration error
(ECE, 15 equal-width bins of the top class's probability), negative log-likelihood
(NLL) and Brier score, and the bins a reliability diagram draws.

Multi-label models are scored per (image, label) pair as independent yes/no events."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
EPS = 1e-15  # probabilities are clipped to [EPS, 1 - EPS] for the log-likelihood


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width bin of confidence over (0, 1]: count, mean confidence, accuracy."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_conf = np.bincount(which, weights=conf, minlength=bins)
    sum_hit = np.bincount(which, weights=hit, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        accuracy = np.where(count > 0, sum_hit / count, np.nan)
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def ece_of(bins: dict) -> float:
    count = bins["count"]
    n = count.sum()
    if n == 0:
        return float("nan")
    used = count > 0
    gap = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(count[used] / n * gap))


def multiclass_calibration(P: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """ece (top-label), nll and brier (summed over classes, averaged over images)."""
    P = np.asarray(P, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return {"ece": None, "nll": None, "brier": None}
    rel = reliability_bins(P.max(axis=1), P.argmax(axis=1) == y, bins)
    onehot = np.eye(P.shape[1])[y]
    p_true = np.clip(P[np.arange(len(y)), y], EPS, 1.0)
    return {
        "ece": ece_of(rel),
        "nll": float(-np.mean(np.log(p_true))),
        "brier": float(np.mean(np.sum((P - onehot) ** 2, axis=1))),
        "reliability": rel,
    }


def multilabel_calibration(P: np.ndarray, Y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The same over every (image, label) pair: ECE of the probability of "yes",
    binary NLL and Brier averaged over pairs."""
    p = np.clip(np.asarray(P, dtype=np.float64).ravel(), EPS, 1 - EPS)
    t = np.asarray(Y, dtype=bool).ravel()
    if len(t) == 0:
        return {"ece": None, "nll": None, "brier": None}
    rel = reliability_bins(p, t, bins)
    return {
        "ece": ece_of(rel),
        "nll": float(-np.mean(np.where(t, np.log(p), np.log(1 - p)))),
        "brier": float(np.mean((p - t) ** 2)),
        "reliability": rel,
    }
