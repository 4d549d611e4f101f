"""Metrics of a multi-label model on labelled images: mean average precision (mAP, over
the labels that occur), micro and macro F1, subset accuracy (every label right) and per
label precision, recall, F1, average precision and support. scikit-learn's definitions
(zero_division=0), in numpy: evaluate stays free of scikit-learn (tested equal)."""

from __future__ import annotations

import numpy as np

from tlearn.heads.multilabel import average_precision


def multilabel_metrics(Y: np.ndarray, P: np.ndarray, predicted: np.ndarray, labels) -> dict:
    """Y: true (n, L) booleans; P: probabilities (n, L); predicted: (n, L) booleans."""
    Y = np.asarray(Y, dtype=bool)
    Z = np.asarray(predicted, dtype=bool)
    n = len(Y)
    if n == 0:
        return {"mAP": None, "micro_f1": None, "macro_f1": None, "subset_accuracy": None,
                "n_images": 0, "per_label": {}}  # fmt: skip
    tp = (Y & Z).sum(axis=0).astype(np.float64)
    fp = (~Y & Z).sum(axis=0).astype(np.float64)
    fn = (Y & ~Z).sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    aps = [average_precision(Y[:, j], P[:, j]) for j in range(Y.shape[1])]
    present = [a for a in aps if a is not None]
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "mAP": float(np.mean(present)) if present else None,
        "micro_f1": float(2 * tp.sum() / denom) if denom > 0 else 0.0,
        "macro_f1": float(f1.mean()),
        "subset_accuracy": float(np.mean(np.all(Y == Z, axis=1))),
        "n_images": int(n),
        "per_label": {
            lab: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "ap": aps[j],
                "support": int(Y[:, j].sum()),
            }
            for j, lab in enumerate(labels)
        },
    }
