"""Likely label errors and outliers for `tlearn audit`, from out-of-fold predictions.

Label errors: the linear head that `fit` uses (StandardScaler + logistic regression, C
chosen by the same stratified cross-validation) gives every image a probability for each
class from a model that never saw it (`cross_val_predict` over StratifiedKFold). Those
out-of-fold probabilities are ranked with confident learning: cleanlab's
`find_label_issues` (prune by noise rate: per class pair, as many images as the estimated
joint distribution of given and true labels says are mislabelled), ordered by
self-confidence, the probability of the given label, lowest first; the other images the
out-of-fold model assigns to another class follow, marked as such. cleanlab is the
reference implementation of the method (Northcutt et al., JAIR 2021), maintained, pure
Python, and needs only numpy, scikit-learn, pandas, tqdm and termcolor; it is imported
only when an audit runs.

Outliers: images least like their class. For each image, the mean cosine distance to its
k nearest images of the same class in the other folds (the same folds), so an image
never counts itself. Flagged when above Q3 + 1.5 IQR of its class (Tukey's fence),
ranked by how far above the class median they lie in IQRs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from tlearn.heads.linear import MAX_ITER, LinearHead, make_estimator
from tlearn.jobs.audit_dups import block_rows, unit_rows


@dataclass
class OutOfFold:
    """Out-of-fold class probabilities for every row, and how they were made."""

    probabilities: np.ndarray  # (n, K)
    folds: np.ndarray  # (n,) the fold each row was held out in
    n_folds: int
    C: float
    notes: list[str] = field(default_factory=list)


def fold_of(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold each row is held out in: StratifiedKFold, shuffled with `seed` (as the
    linear head's cross-validation splits)."""
    # scikit-learn costs ~1 s to import: only an audit's CV needs it here
    from sklearn.model_selection import StratifiedKFold

    folds = np.zeros(len(y), dtype=np.int64)
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(cv.split(np.zeros(len(y)), y)):
        folds[held] = f
    return folds


def usable_folds(y: np.ndarray, folds: int) -> int:
    """Folds for StratifiedKFold: at most the smallest class's size (0: cannot)."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    smallest = int(counts.min()) if len(counts) else 0
    return min(folds, smallest) if smallest >= 2 else 0


def out_of_fold(
    X: np.ndarray, y: np.ndarray, classes: list[str], *, C: float | None, folds: int, seed: int
) -> OutOfFold | None:
    """Logistic-regression probabilities of each row from the fold that held it out, or
    None when a class has fewer than two images (nothing to cross-validate)."""
    # scikit-learn costs ~1 s to import: only an audit's CV needs it here
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import PredefinedSplit, cross_val_predict

    n_folds = usable_folds(y, folds)
    if n_folds < 2:
        return None
    head = LinearHead(kind="logreg", C=C, folds=n_folds, seed=seed).fit(X, y, classes)
    fold = fold_of(y, n_folds, seed)
    est = make_estimator("logreg", head.C_, seed, MAX_ITER["logreg"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        P = cross_val_predict(est, X, y, cv=PredefinedSplit(fold), method="predict_proba")
    full = np.zeros((len(y), len(classes)), dtype=np.float64)
    present = np.unique(y)  # predict_proba's columns: the classes present, in order
    full[:, present] = P
    return OutOfFold(full, fold, n_folds, float(head.C_), list(head.notes_))


@dataclass
class LabelIssue:
    row: int
    given: int
    suggested: int
    given_probability: float  # out-of-fold probability of the given label
    suggested_probability: float
    confident: bool  # flagged by confident learning (else: only the prediction disagrees)


def label_issues(y: np.ndarray, oof: OutOfFold) -> list[LabelIssue]:
    """Likely label errors, most likely first: the images confident learning flags
    (cleanlab, prune by noise rate), by self-confidence; then the other images whose
    out-of-fold prediction is another class, by self-confidence too. Confident learning
    estimates how many labels are wrong and flags about that many; the disagreements
    after them are the next candidates to look at (on the real-photo check,
    docs/benchmarks.md, a few planted flips were among them)."""
    # cleanlab (and its pandas) only when an audit ranks label issues
    from cleanlab.filter import find_label_issues

    P = oof.probabilities
    present = np.unique(y)
    # cleanlab wants every column to be a class with examples: drop the others
    sub = P[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    remap = np.searchsorted(present, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = find_label_issues(
            labels=remap,
            pred_probs=sub,
            filter_by="prune_by_noise_rate",
            return_indices_ranked_by="self_confidence",
            n_jobs=1,
        )
    flagged = np.asarray(flagged, dtype=np.int64).tolist()
    self_confidence = P[np.arange(len(y)), y]
    others = P.copy()
    others[np.arange(len(y)), y] = -1.0
    suggested = others.argmax(axis=1)
    seen = set(flagged)
    disagree = [
        int(r)
        for r in np.argsort(self_confidence, kind="stable")
        if r not in seen and P[r, suggested[r]] > P[r, y[r]]
    ]
    return [
        LabelIssue(
            row,
            int(y[row]),
            int(suggested[row]),
            float(self_confidence[row]),
            float(P[row, suggested[row]]),
            row in seen,
        )
        for row in flagged + disagree
    ]


@dataclass
class Outlier:
    row: int
    distance: float  # mean cosine distance to the k nearest same-class images
    excess: float  # (distance - class median) / class IQR


def knn_distances(X: np.ndarray, y: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row to its k nearest rows of the same class held out
    in other folds (NaN where the class has no such rows)."""
    Z = unit_rows(X)
    out = np.full(len(y), np.nan)
    for c in np.unique(y):
        for f in np.unique(folds[y == c]):
            q = np.flatnonzero((y == c) & (folds == f))
            ref = np.flatnonzero((y == c) & (folds != f))
            if len(ref) == 0:
                continue
            kk = min(k, len(ref))
            step = block_rows(len(ref))
            for start in range(0, len(q), step):
                rows = q[start : start + step]
                d = 1.0 - Z[rows] @ Z[ref].T
                near = np.partition(d, kk - 1, axis=1)[:, :kk]
                out[rows] = near.mean(axis=1)
    return out


def outliers(y: np.ndarray, distances: np.ndarray) -> list[Outlier]:
    """Rows beyond Tukey's fence of their class, furthest out first."""
    found = []
    for c in np.unique(y):
        rows = np.flatnonzero((y == c) & np.isfinite(distances))
        if len(rows) < 4:
            continue
        d = distances[rows]
        q1, med, q3 = np.percentile(d, [25, 50, 75])
        iqr = max(q3 - q1, 1e-12)
        for r in rows[d > q3 + 1.5 * iqr]:
            found.append(Outlier(int(r), float(distances[r]), float((distances[r] - med) / iqr)))
    return sorted(found, key=lambda o: (-o.excess, o.row))
