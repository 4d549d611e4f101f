"""Calibrated probabilities from a head's decision values (SVM margins, logits).

Multi-class (one label per image): temperature scaling, p = softmax(d / T), one number
fitted by minimising the negative log-likelihood of held-out decisions: the out-of-fold
decisions of the cross-validation that picks C (svm, logreg), or the validation split
(neural heads). It never changes which class wins, so accuracy stays what it was.
Measured against Platt's sigmoid (one-vs-rest, renormalised) on real photos
(docs/benchmarks.md, section 12): on a 10-class set Platt doubled the validation NLL
(0.63 vs 0.32) and changed 4% of the predictions; on two classes the two were within
0.01 NLL. So tlearn uses temperature scaling.

Multi-label (each label its own yes/no): Platt scaling per label, p_l = sigmoid(a_l d_l
+ b_l) with Platt's prior-smoothed targets, fitted on the same held-out decisions; the
bias matters there because a label's decision threshold is not at 0.5 probability.

numpy only: predict applies these warm, without scikit-learn or torch.
"""

from __future__ import annotations

import numpy as np

from tlearn.heads.neural import softmax

T_BOUNDS = (-9.0, 9.0)  # log T searched in this range (T from 1.2e-4 to 8e3)


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def golden_min(f, lo: float, hi: float, iterations: int = 80) -> float:
    """The minimiser of a unimodal f on [lo, hi] (golden-section search)."""
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def soft_targets(y: np.ndarray, k: int) -> np.ndarray:
    """Platt's prior-smoothed targets for one-hot labels: 1 - 1/(n_y + 2) on the true
    class, the rest spread evenly (used only when the held-out decisions are separable,
    where hard targets would drive T to 0 and every probability to exactly 0 or 1)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    eps = 1.0 / (counts[y] + 2.0)
    onehot = np.eye(k)[y]
    return onehot * (1.0 - eps)[:, None] + (1.0 - onehot) * (eps / max(k - 1, 1))[:, None]


def fit_temperature(decision: np.ndarray, y: np.ndarray) -> float:
    """T minimising the NLL of softmax(decision / T) for labels y (held-out decisions).

    The NLL is convex in 1/T, so a golden-section search over log T finds the optimum.
    Classes no held-out row belongs to still count in the softmax. When every row is
    already classified correctly the hard-target optimum is T -> 0; then Platt's
    smoothed targets give a finite T instead."""
    D = np.asarray(decision, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = D.shape[1]
    D = np.where(D < -1e8, -1e8, D)  # classes a fold never saw: kept far below, finite
    separable = bool(np.all(D.argmax(axis=1) == y))
    Q = soft_targets(y, k) if separable else np.eye(k)[y]

    def nll(log_t: float) -> float:
        return float(-np.mean(np.sum(Q * log_softmax(D / np.exp(log_t)), axis=1)))

    return float(np.exp(golden_min(nll, *T_BOUNDS)))


def temperature_probabilities(decision: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(decision, dtype=np.float64) / float(temperature))


def fit_platt(decision: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(a, b) of Platt's sigmoid p = 1 / (1 + exp(-(a d + b))) for one binary label:
    Newton's method with a line search on prior-smoothed targets (Lin, Lin and Weng's
    version of Platt's algorithm, as scikit-learn's sigmoid calibration uses)."""
    d = np.asarray(decision, dtype=np.float64)
    t = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    target = np.where(t, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 1.0, float(np.log((n_pos + 1.0) / (n_neg + 1.0)))  # slope 1, the prior's log-odds

    def loss(a: float, b: float) -> float:
        z = a * d + b
        return float(np.sum(np.logaddexp(0.0, z) - target * z))

    current = loss(a, b)
    for _ in range(100):
        p = sigmoid(a * d + b)
        w = np.maximum(p * (1.0 - p), 1e-12)
        g = np.array([np.sum((p - target) * d), np.sum(p - target)])
        H = np.array([[np.sum(w * d * d), np.sum(w * d)], [np.sum(w * d), np.sum(w)]])
        try:
            step = np.linalg.solve(H + 1e-12 * np.eye(2), g)
        except np.linalg.LinAlgError:
            break
        scale, new = 1.0, np.inf
        while scale > 1e-10:  # halve the Newton step until the loss does not grow
            new = loss(a - scale * step[0], b - scale * step[1])
            if new <= current:
                break
            scale /= 2.0
        if new > current:
            break
        a, b = a - scale * step[0], b - scale * step[1]
        done = current - new <= 1e-12 * max(1.0, abs(current))
        current = new
        if done:
            break
    return float(a), float(b)


def platt_probabilities(decision: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-label probabilities sigmoid(a_l d_l + b_l) of a (n, L) decision matrix."""
    D = np.asarray(decision, dtype=np.float64)
    return sigmoid(D * np.asarray(a, dtype=np.float64) + np.asarray(b, dtype=np.float64))
