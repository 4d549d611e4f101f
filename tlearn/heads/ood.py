""" "Unknown": how unlike the training images a new image is, from its pooled features.

The score is the cosine distance to the nearest training image (k = 1) in a stored bank
of training features. The threshold is set on out-of-fold scores so that FLAG_RATE (5%)
of training images would be flagged: with every training image in the bank, each fold's
images are scored against the other folds; with more images than the bank holds, the
images left out of the bank are scored against it (exactly what a new image meets).

Chosen by measurement (docs/benchmarks.md, section 12) over Mahalanobis distance to the
nearest class mean (shared Ledoit-Wolf covariance) and over k = 5, 10 and standardised
features: all separate insects from road pictures perfectly (AUROC 1.0, except
Mahalanobis at 0.965), and on the harder digits-0-4 vs digits-5-9 style splits the
nearest neighbour was best (AUROC 0.878, 0.741, 0.784 against 0.841, 0.723, 0.759).

Storage: at most MAX_BANK training images (a seeded random subset beyond that), unit
rows in float16: 4096 x 1280 features are 10 MiB, and float16 rounding moves a
distance by about 1e-3. The bank needs no labels, so multi-label models use it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD = "knn-cosine"
K_NEIGHBOURS = 1
FLAG_RATE = 0.05
MAX_BANK = 4096
FOLDS = 5
MIN_IMAGES = 10  # fewer training images give no usable threshold
BLOCK_ENTRIES = 1 << 24  # distances computed per block: at most 64 MiB of float32


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (all-zero rows stay zero), float32."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def knn_distance(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each unit query row to its k nearest unit bank rows."""
    Q = np.asarray(queries, dtype=np.float32)
    B = np.asarray(bank, dtype=np.float32)
    out = np.empty(len(Q), dtype=np.float32)
    if len(Q) == 0:
        return out
    k = min(k, len(B))
    step = int(max(1, BLOCK_ENTRIES // max(1, len(B))))
    for start in range(0, len(Q), step):
        d = 1.0 - Q[start : start + step] @ B.T
        near = np.partition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else d
        out[start : start + step] = near.mean(axis=1)
    return np.clip(out, 0.0, 2.0)


@dataclass
class KnnOOD:
    """Nearest-neighbour cosine distance to a bank of training features."""

    bank: np.ndarray  # (m, D) float16 unit rows
    threshold: float
    k: int = K_NEIGHBOURS

    def score(self, X: np.ndarray) -> np.ndarray:
        return knn_distance(unit_rows(X), self.bank, self.k)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


@dataclass
class OODFit:
    scorer: KnnOOD
    info: dict  # what config.json records
    oof_scores: np.ndarray  # the scores the threshold was set on


def fit_knn_ood(
    X: np.ndarray,
    *,
    seed: int = 0,
    k: int = K_NEIGHBOURS,
    flag_rate: float = FLAG_RATE,
    max_bank: int = MAX_BANK,
    folds: int = FOLDS,
) -> OODFit | None:
    """The bank and its threshold for training features X; None with too few images."""
    Z = unit_rows(X)
    n = len(Z)
    if n < MIN_IMAGES:
        return None
    rng = np.random.default_rng(seed)
    if n > max_bank:
        order = rng.permutation(n)
        bank_rows = np.sort(order[:max_bank])
        held = np.sort(order[max_bank : 2 * max_bank])  # at most max_bank of the others
        bank = Z[bank_rows].astype(np.float16)
        scores = knn_distance(Z[held], bank, k)
        how = f"{len(held)} training images left out of the bank, scored against it"
    else:
        bank = Z.astype(np.float16)
        fold = rng.permutation(n) % min(folds, n)
        scores = np.empty(n, dtype=np.float32)
        for f in np.unique(fold):
            scores[fold == f] = knn_distance(Z[fold == f], bank[fold != f], k)
        how = f"{len(np.unique(fold))}-fold out-of-fold over the {n} training images"
    threshold = float(np.quantile(scores.astype(np.float64), 1.0 - flag_rate))
    info = {
        "method": METHOD,
        "k": int(k),
        "threshold": threshold,
        "flag_rate": float(flag_rate),
        "threshold_from": how,
        "bank": int(len(bank)),
        "of": int(n),
        "dtype": "float16",
    }
    return OODFit(KnnOOD(bank, threshold, k), info, scores)
