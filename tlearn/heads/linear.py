"""Linear heads on extracted features: StandardScaler + LinearSVC or LogisticRegression.

The default C is chosen by stratified cross-validation over a grid that reaches small
values: on real photo sets the textbook C=1 both scores worse and fits far slower
(see docs/benchmarks.md). The fitted head is kept as plain arrays (scaler mean/scale,
coef, intercept) so it can be saved as safetensors and applied without scikit-learn,
e.g. as a 1x1 convolution over a feature map.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from tlearn.core.deadline import Deadline
from tlearn.core.errors import DataError, UsageError

HEAD_KINDS = ("svm", "logreg")
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_C_NO_CV = 1e-2  # used when classes are too small to cross-validate
MAX_ITER = {"svm": 2000, "logreg": 1000}


def parse_C(value: str | float) -> float | None:
    """'auto' -> None (cross-validate); else a positive float."""
    if isinstance(value, (int, float)):
        c = float(value)
    elif str(value).strip().lower() == "auto":
        return None
    else:
        try:
            c = float(value)
        except ValueError:
            raise UsageError(f"--C '{value}': use 'auto' or a positive number like 0.01") from None
    if not np.isfinite(c) or c <= 0:
        raise UsageError(f"--C {value}: must be a positive number (or 'auto')")
    return c


def make_estimator(kind: str, C: float, seed: int, max_iter: int):
    # scikit-learn costs ~1 s to import: only fitting needs it, not predict
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind == "svm":
        clf = LinearSVC(C=C, max_iter=max_iter, random_state=seed, dual="auto")
    elif kind == "logreg":
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    else:
        raise UsageError(f"unknown --head '{kind}'; allowed: {', '.join(HEAD_KINDS)}")
    return make_pipeline(StandardScaler(), clf)


@dataclass
class CVResult:
    C: float
    mean: float
    std: float
    fit_seconds: float


@dataclass
class LinearHead:
    """A linear classifier on standardised features (scikit-learn estimator style:
    hyper-parameters here, work in `fit`)."""

    kind: str = "svm"
    C: float | None = None  # None = choose by cross-validation
    folds: int = 5
    seed: int = 0
    max_iter: int | None = None
    n_jobs: int | None = None
    keep_oof: bool = False  # with a given C, also cross-validate for oof_decision_ (fit does)
    deadline: Deadline | None = None  # --time-limit: the C grid stops when it passes
    # fitted state
    classes_: list[str] = field(default_factory=list)
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None
    coef_: np.ndarray | None = None  # (K, D), one row per class, even for K=2
    intercept_: np.ndarray | None = None  # (K,)
    C_: float | None = None
    folds_: int | None = None  # the folds CV actually used (fewer for a small class)
    cv_results_: list[CVResult] = field(default_factory=list)
    oof_decision_: np.ndarray | None = None  # (n, K) out-of-fold decisions at C_ (heads.posthoc)
    converged_: bool = True
    time_stopped_: bool = False  # the C grid stopped early for the time limit
    notes_: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise UsageError(f"unknown --head '{self.kind}'; allowed: {', '.join(HEAD_KINDS)}")

    @property
    def iterations(self) -> int:
        return self.max_iter or MAX_ITER[self.kind]

    def fit(self, X: np.ndarray, y: np.ndarray, classes: list[str], progress=None) -> LinearHead:
        """Fit on features X with labels y (indices into `classes`); `progress(done,
        total)` follows the C grid's cross-validation."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        present = np.unique(y)
        if len(present) < 2:
            raise DataError(
                f"need images of at least two classes to fit, got {len(present)} "
                f"({', '.join(classes[i] for i in present) or 'none'})"
            )
        self.classes_ = list(classes)
        self.notes_ = []
        self.oof_decision_ = None
        self.C_ = self.C if self.C is not None else self._choose_C(X, y, progress)
        if self.C is not None and self.keep_oof:
            self.oof_decision_ = self._cv_at(self.C_, X, y, self._cv(y), 1)[1]
        est = self._fit_one(X, y, self.C_)
        self._take_arrays(est, y)
        return self

    def _fit_one(self, X, y, C):
        # scikit-learn costs ~1 s to import: only fitting needs it, not predict
        from sklearn.exceptions import ConvergenceWarning

        est = make_estimator(self.kind, C, self.seed, self.iterations)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            est.fit(X, y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            self.converged_ = False
            self.notes_.append(
                f"{self.kind} with C={C:g} did not converge in {self.iterations} iterations; "
                "the result is usable but a smaller --C fits faster and often generalises better"
            )
        return est

    def _cv(self, y: np.ndarray):
        """The stratified folds of the C search (None when a class is too small)."""
        # scikit-learn costs ~1 s to import: only fitting needs it, not predict
        from sklearn.model_selection import StratifiedKFold

        counts = np.bincount(y)
        counts = counts[counts > 0]
        folds = int(min(self.folds, counts.min()))
        self.folds_ = folds if folds >= 2 else None
        if folds < 2:
            return None
        return StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)

    def _cv_at(self, C: float, X, y, cv, n_jobs) -> tuple[CVResult, np.ndarray | None]:
        """CV accuracy at C and the out-of-fold decisions (n, K), each row scored by the
        fold model that did not see it, in the same form as decision_function."""
        # scikit-learn costs ~1 s to import: only fitting needs it, not predict
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import cross_validate

        if cv is None:
            return CVResult(C, float("nan"), float("nan"), 0.0), None
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = cross_validate(
                make_estimator(self.kind, C, self.seed, self.iterations),
                X,
                y,
                cv=cv,
                n_jobs=n_jobs,
                return_estimator=True,
                return_indices=True,
            )
        scores = res["test_score"]
        oof = np.zeros((len(y), len(self.classes_)), dtype=np.float32)
        for est, held in zip(res["estimator"], res["indices"]["test"], strict=True):
            arrays = linear_arrays(est, self.kind, len(self.classes_))
            oof[held] = apply_arrays(arrays, X[held])
        r = CVResult(C, float(scores.mean()), float(scores.std()), time.perf_counter() - t0)
        return r, oof

    def _choose_C(self, X: np.ndarray, y: np.ndarray, progress=None) -> float:
        cv = self._cv(y)
        if cv is None:
            counts = np.bincount(y)
            self.notes_.append(
                f"a class has only {counts[counts > 0].min()} image(s): cannot cross-validate "
                f"C; using C={DEFAULT_C_NO_CV:g}"
            )
            return DEFAULT_C_NO_CV
        # Parallel folds pay only when a fold's fit outweighs starting worker processes.
        n_jobs = self.n_jobs if self.n_jobs is not None else (-1 if X.size > 2_000_000 else 1)
        best: CVResult | None = None
        worse_in_a_row = 0
        self.cv_results_ = []
        for C in C_GRID:  # ascending: small C is cheap; stop once scores keep falling
            if best is not None and self.deadline is not None and self.deadline.passed():
                self.time_stopped_ = True
                self.notes_.append(
                    f"time limit reached: the C grid stopped before C={C:g}; "
                    f"kept the best so far, C={best.C:g}"
                )
                break
            r, oof = self._cv_at(C, X, y, cv, n_jobs)
            self.cv_results_.append(r)
            if progress is not None:
                progress(len(self.cv_results_), len(C_GRID))
            if best is None or r.mean > best.mean + 1e-9:
                best, worse_in_a_row, self.oof_decision_ = r, 0, oof
            else:
                worse_in_a_row += 1
                if worse_in_a_row >= 2 and r.mean < best.mean:
                    break
        if progress is not None:  # the grid may stop early: the stage is done either way
            progress(len(C_GRID), len(C_GRID))
        return best.C

    def _take_arrays(self, est, y) -> None:
        self.mean_, self.scale_, self.coef_, self.intercept_ = linear_arrays(
            est, self.kind, len(self.classes_)
        )

    # ------------------------------------------------------------------ inference

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return apply_arrays((self.mean_, self.scale_, self.coef_, self.intercept_), X)

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class scores: probabilities for logreg, SVM margins for svm."""
        d = self.decision_function(X)
        if self.kind == "logreg":
            d = d - d.max(axis=1, keepdims=True)
            e = np.exp(d)
            return e / e.sum(axis=1, keepdims=True)
        return d

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.decision_function(X).argmax(axis=1)

    # ------------------------------------------------------------------ persistence

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
            "cv": [r.__dict__ for r in self.cv_results_],
        }

    @classmethod
    def from_saved(cls, hyper: dict, tensors: dict, classes: list[str]) -> LinearHead:
        head = cls(kind=hyper["type"], C=hyper.get("C"), seed=int(hyper.get("seed", 0)))
        head.classes_ = list(classes)
        head.C_ = hyper.get("C")
        head.mean_ = tensors["scaler_mean"]
        head.scale_ = tensors["scaler_scale"]
        head.coef_ = tensors["coef"]
        head.intercept_ = tensors["intercept"]
        return head

    @staticmethod
    def expected_shapes(n_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
        return {
            "scaler_mean": (dim,),
            "scaler_scale": (dim,),
            "coef": (n_classes, dim),
            "intercept": (n_classes,),
        }


def linear_arrays(est, kind: str, n_classes: int):
    """(scaler mean, scaler scale, coef (K, D), intercept (K,)) of a fitted scikit-learn
    pipeline, one row per class of our class list, even for two classes."""
    scaler, clf = est[0], est[-1]
    mean = scaler.mean_.astype(np.float32)
    scale = scaler.scale_.astype(np.float32)
    coef = clf.coef_.astype(np.float32)
    intercept = np.atleast_1d(clf.intercept_).astype(np.float32)
    # sklearn's clf.classes_ are the label ids seen in y; map them to our class list.
    full_coef = np.zeros((n_classes, coef.shape[1]), dtype=np.float32)
    # Classes absent from training can never win.
    full_int = np.full((n_classes,), -1e9, dtype=np.float32)
    seen = list(clf.classes_)
    if coef.shape[0] == 1:  # binary: sklearn keeps one row for seen[1]
        # Logistic: +-w/2 makes softmax equal sklearn's predict_proba exactly.
        # SVM: +-w keeps the score equal to the SVM margin.
        half = 0.5 if kind == "logreg" else 1.0
        full_coef[seen[0]], full_int[seen[0]] = -half * coef[0], -half * intercept[0]
        full_coef[seen[1]], full_int[seen[1]] = half * coef[0], half * intercept[0]
    else:
        for row, label in enumerate(seen):
            full_coef[label], full_int[label] = coef[row], intercept[row]
    return mean, scale, full_coef, full_int


def apply_arrays(arrays, X: np.ndarray) -> np.ndarray:
    """Decision values of linear_arrays' (mean, scale, coef, intercept) for features X."""
    mean, scale, coef, intercept = arrays
    Z = (np.asarray(X, dtype=np.float32) - mean) / scale
    return Z @ coef.T + intercept
