"""Multi-label heads: each image has a set of labels (possibly empty), each label its own
yes/no question.

Label sets are written as labels joined by ';' ("asphalt;wet"; "" = no label). Images
keep one string per set everywhere images move (ImageSet classes, features CSVs), and
`label_matrix` turns those strings into an (n, L) boolean matrix.

The linear head is one-vs-rest: a StandardScaler + LinearSVC or LogisticRegression per
label, saved as one (L, D) weight matrix like a multi-class linear head. C is chosen
once for all labels by the mean average precision (mAP) of out-of-fold decisions, each
label cross-validated with folds stratified on that label. Those out-of-fold decisions
then calibrate each label (heads.calibration, Platt) and set its threshold: the one with
the best F1 on the out-of-fold probabilities (`best_f1_thresholds`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tlearn.core.errors import DataError, UsageError
from tlearn.core.labelsets import parse_label_set
from tlearn.heads.linear import (
    C_GRID,
    DEFAULT_C_NO_CV,
    HEAD_KINDS,
    MAX_ITER,
    CVResult,
    apply_arrays,
    make_estimator,
)


def label_matrix(
    cells: Sequence[str | None], vocabulary: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """(Y, labels): Y[i, j] says whether image i has label j. Labels default to the sorted
    labels found; with `vocabulary`, an unknown label is a DataError."""
    sets = [parse_label_set(c) for c in cells]
    found = sorted({lab for s in sets for lab in s})
    labels = list(vocabulary) if vocabulary is not None else found
    index = {lab: j for j, lab in enumerate(labels)}
    unknown = [lab for lab in found if lab not in index]
    if unknown:
        raise DataError(
            f"label(s) {', '.join(unknown[:5])} are not among the model's labels "
            f"({', '.join(labels)})"
        )
    Y = np.zeros((len(sets), len(labels)), dtype=bool)
    for i, s in enumerate(sets):
        for lab in s:
            Y[i, index[lab]] = True
    return Y, labels


# ----------------------------------------------------------------------------- metrics


def average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    """scikit-learn's average_precision_score for one label (None without positives):
    the sum over decreasing score thresholds of (R_n - R_n-1) P_n."""
    y = np.asarray(y, dtype=bool)
    if not y.any():
        return None
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, t = np.asarray(score, dtype=np.float64)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    tps = np.cumsum(t)[last].astype(np.float64)
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_thresholds(P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per label, the probability threshold with the best F1 on (P, Y): halfway between
    the lowest probability called positive and the next one below (0.5 for a label with
    no positives)."""
    out = np.full(P.shape[1], 0.5)
    for j in range(P.shape[1]):
        p, y = P[:, j].astype(np.float64), Y[:, j].astype(bool)
        if not y.any():
            continue
        order = np.argsort(-p, kind="mergesort")
        ps, ys = p[order], y[order]
        last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]
        tp = np.cumsum(ys)[last]
        f1 = 2 * tp / (last + 1 + y.sum())
        best = int(np.argmax(f1))
        i = last[best]
        below = ps[i + 1] if i + 1 < len(ps) else 0.0
        out[j] = (ps[i] + below) / 2.0
    return np.clip(out, 1e-6, 1.0)


# ----------------------------------------------------------------------------- the head


@dataclass
class MultiLabelLinear:
    """One-vs-rest linear head on standardised features (fitted arrays as LinearHead's:
    the scaler, coef (L, D), intercept (L,), so it saves and scores the same way)."""

    kind: str = "svm"
    C: float | None = None
    folds: int = 5
    seed: int = 0
    labels_: list[str] = field(default_factory=list)
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None
    coef_: np.ndarray | None = None
    intercept_: np.ndarray | None = None
    C_: float | None = None
    folds_: int | None = None  # the folds CV actually used (fewer for a rare label)
    cv_results_: list[CVResult] = field(default_factory=list)
    oof_decision_: np.ndarray | None = None  # (n, L) out-of-fold decisions at C_
    oof_ap_: np.ndarray | None = None  # each label's out-of-fold average precision at C_
    oof_seconds_: float = 0.0
    converged_: bool = True
    notes_: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise UsageError(f"unknown --head '{self.kind}'; allowed: {', '.join(HEAD_KINDS)}")

    @property
    def iterations(self) -> int:
        return MAX_ITER[self.kind]

    def fit(self, X: np.ndarray, Y: np.ndarray, labels: list[str]) -> MultiLabelLinear:
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=bool)
        pos = Y.sum(axis=0)
        always = [labels[j] for j in np.flatnonzero(pos == len(Y))]
        never = [labels[j] for j in np.flatnonzero(pos == 0)]
        if always or never:
            what = always or never
            say = "every" if always else "no"
            raise DataError(
                f"label(s) {', '.join(what)} are on {say} training image: nothing to learn; "
                "drop them from the labels file"
            )
        self.labels_, self.notes_, self.cv_results_ = list(labels), [], []
        folds = int(min(self.folds, pos.min(), (len(Y) - pos).min()))
        self.folds_ = folds if folds >= 2 else None
        if folds < 2:
            self.notes_.append(
                "a label has fewer than 2 images with (or without) it: cannot cross-validate; "
                f"C={self.C if self.C is not None else DEFAULT_C_NO_CV:g}, no calibration"
            )
            self.C_ = self.C if self.C is not None else DEFAULT_C_NO_CV
        elif self.C is not None:
            self.C_ = self.C
            t0 = time.perf_counter()
            self.oof_decision_, self.oof_ap_ = self.out_of_fold(X, Y, self.C, folds)
            self.oof_seconds_ = time.perf_counter() - t0
        else:
            self.C_ = self._choose_C(X, Y, folds)
        self._fit_all(X, Y)
        return self

    def out_of_fold(self, X, Y, C: float, folds: int) -> tuple[np.ndarray, np.ndarray]:
        """(out-of-fold decisions (n, L), each label's AP) at C."""
        # scikit-learn costs ~1 s to import: only fitting needs it
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import StratifiedKFold

        D = np.zeros(Y.shape, dtype=np.float64)
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for j in range(Y.shape[1]):
                for tr, te in cv.split(X, Y[:, j]):
                    est = make_estimator(self.kind, C, self.seed, self.iterations)
                    est.fit(X[tr], Y[tr, j])
                    D[te, j] = est.decision_function(X[te])
        ap = np.asarray([average_precision(Y[:, j], D[:, j]) for j in range(Y.shape[1])])
        return D, ap.astype(np.float64)

    def _choose_C(self, X, Y, folds: int) -> float:
        best, best_D, worse = None, None, 0
        for C in C_GRID:  # ascending, stopping once the CV mAP keeps falling (as LinearHead)
            t0 = time.perf_counter()
            D, ap = self.out_of_fold(X, Y, C, folds)
            r = CVResult(C, float(ap.mean()), float(ap.std()), time.perf_counter() - t0)
            self.cv_results_.append(r)
            if best is None or r.mean > best.mean + 1e-9:
                best, best_D, worse, self.oof_ap_ = r, D, 0, ap
            else:
                worse += 1
                if worse >= 2 and r.mean < best.mean:
                    break
        self.oof_decision_ = best_D
        return best.C

    def _fit_all(self, X, Y) -> None:
        # scikit-learn costs ~1 s to import: only fitting needs it
        from sklearn.exceptions import ConvergenceWarning

        coefs, intercepts = [], []
        for j in range(Y.shape[1]):
            est = make_estimator(self.kind, self.C_, self.seed, self.iterations)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                est.fit(X, Y[:, j])
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                self.converged_ = False
            scaler, clf = est[0], est[-1]
            coefs.append(clf.coef_[0])
            intercepts.append(float(np.atleast_1d(clf.intercept_)[0]))
        if not self.converged_:
            self.notes_.append(
                f"{self.kind} with C={self.C_:g} did not converge for some labels; "
                "a smaller --C fits faster"
            )
        self.mean_ = scaler.mean_.astype(np.float32)  # the same scaler for every label
        self.scale_ = scaler.scale_.astype(np.float32)
        self.coef_ = np.asarray(coefs, dtype=np.float32)
        self.intercept_ = np.asarray(intercepts, dtype=np.float32)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return apply_arrays((self.mean_, self.scale_, self.coef_, self.intercept_), X)

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "scaler_mean": self.mean_,
            "scaler_scale": self.scale_,
            "coef": self.coef_,
            "intercept": self.intercept_,
        }

    def hyperparameters(self) -> dict:
        return {
            "type": self.kind,
            "C": self.C_,
            "C_requested": "auto" if self.C is None else self.C,
            "folds": self.folds_,  # what CV used (None: no CV); the request is below
            "folds_requested": self.folds,
            "max_iter": self.iterations,
            "seed": self.seed,
            "converged": self.converged_,
            "one_vs_rest": True,
            "cv_metric": "mAP",
            "cv": [r.__dict__ for r in self.cv_results_],
        }
