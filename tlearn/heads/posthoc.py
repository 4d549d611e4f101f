"""What a model learns after its head, from images the head did not train on: calibrated
probabilities (heads.calibration), conformal prediction sets (heads.conformal), the
out-of-distribution scorer (heads.ood) and, for multi-label models, each label's
decision threshold (heads.multilabel).

Saved in the model directory as config.json's "calibration" section plus
calibration.safetensors (tensors below); a directory without them (made by an older
tlearn) loads as a model without calibration. numpy only: predict applies it warm.

Tensors: temperature scaling needs none (the number is in the JSON); conformal_scores
(n,) the sorted held-out nonconformity scores; ood_bank (m, D) float16 training features;
platt_a, platt_b (L,) and label_thresholds (L,) for multi-label models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tlearn.core.errors import ArtifactError
from tlearn.heads.calibration import (
    fit_platt,
    fit_temperature,
    log_softmax,
    platt_probabilities,
    temperature_probabilities,
)
from tlearn.heads.conformal import nonconformity
from tlearn.heads.ood import METHOD as OOD_METHOD
from tlearn.heads.ood import KnnOOD, fit_knn_ood

CALIBRATION_FILE = "calibration.safetensors"
SECTION_VERSION = 1
TASKS = ("multi-class", "multi-label")


@dataclass
class PostHoc:
    """The post-hoc parts of a model; any of them may be missing (None)."""

    task: str = "multi-class"
    temperature: float | None = None
    platt_a: np.ndarray | None = None
    platt_b: np.ndarray | None = None
    conformal_scores: np.ndarray | None = None
    ood: KnnOOD | None = None
    thresholds: np.ndarray | None = None
    info: dict = field(default_factory=dict)  # how calibration was fitted (config.json)
    ood_info: dict = field(default_factory=dict)
    threshold_info: dict = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None or self.platt_a is not None

    def probabilities(self, decision: np.ndarray) -> np.ndarray | None:
        """Calibrated probabilities from decision values, or None without calibration."""
        if self.task == "multi-label":
            if self.platt_a is None:
                return None
            return platt_probabilities(decision, self.platt_a, self.platt_b)
        if self.temperature is None:
            return None
        return temperature_probabilities(decision, self.temperature)

    # ------------------------------------------------------------------ persistence

    def to_config(self) -> dict:
        out = {"version": SECTION_VERSION, **self.info}
        if self.task == "multi-label":
            out["probability"] = {"method": "platt"} if self.platt_a is not None else None
        else:
            t = self.temperature
            out["probability"] = None if t is None else {"method": "temperature", "temperature": t}
        out["conformal"] = (
            None
            if self.conformal_scores is None
            else {
                "score": "1 - calibrated probability of the true class",
                "n": int(len(self.conformal_scores)),
            }
        )
        out["ood"] = None if self.ood is None else dict(self.ood_info)
        out["thresholds"] = None if self.thresholds is None else dict(self.threshold_info)
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        t: dict[str, np.ndarray] = {}
        if self.conformal_scores is not None:
            t["conformal_scores"] = np.asarray(self.conformal_scores, dtype=np.float32)
        if self.ood is not None:
            t["ood_bank"] = np.asarray(self.ood.bank, dtype=np.float16)
        if self.platt_a is not None:
            t["platt_a"] = np.asarray(self.platt_a, dtype=np.float32)
            t["platt_b"] = np.asarray(self.platt_b, dtype=np.float32)
        if self.thresholds is not None:
            t["label_thresholds"] = np.asarray(self.thresholds, dtype=np.float32)
        return t

    @classmethod
    def from_saved(
        cls, section, tensors: dict, *, task: str, n_classes: int, dim: int, where
    ) -> PostHoc:
        """The saved parts, every number and tensor checked (ArtifactError naming `where`)."""
        return _from_saved(cls, section, tensors, task, n_classes, dim, where)


def _bad(where, what: str) -> ArtifactError:
    return ArtifactError(f"{where}: calibration {what}; refit the model (or remove the section)")


def _number(where, value, name: str, *, positive=False, low=None, high=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, f"'{name}' must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise _bad(where, f"'{name}' must be positive, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(where, f"'{name}' must be between {low} and {high}, got {value!r}")
    return float(value)


def _tensor(where, tensors, name: str, shape: tuple, *, low=None, high=None) -> np.ndarray:
    if name not in tensors:
        raise _bad(where, f"tensor {name} is missing")
    t = np.asarray(tensors[name])
    if t.shape != shape:
        raise _bad(where, f"tensor {name} has shape {t.shape}, expected {shape}")
    if t.dtype.kind != "f" or not np.all(np.isfinite(t)):
        raise _bad(where, f"tensor {name} must hold finite floats")
    if (low is not None and t.size and t.min() < low) or (
        high is not None and t.size and t.max() > high
    ):
        raise _bad(where, f"tensor {name} holds values outside [{low}, {high}]")
    return t


def _from_saved(cls, section, tensors, task, n_classes, dim, where) -> PostHoc:
    if not isinstance(section, dict) or section.get("version") != SECTION_VERSION:
        raise _bad(where, f"section must be an object with version {SECTION_VERSION}")
    if task not in TASKS:
        raise _bad(where, f"task {task!r} is not one of {', '.join(TASKS)}")
    out = cls(task=task, info={})
    used: set[str] = set()
    prob = section.get("probability")
    if prob is not None:
        if not isinstance(prob, dict):
            raise _bad(where, "'probability' must be an object or null")
        if task == "multi-label":
            if prob.get("method") != "platt":
                raise _bad(where, f"multi-label probability method {prob.get('method')!r}")
            out.platt_a = _tensor(where, tensors, "platt_a", (n_classes,))
            out.platt_b = _tensor(where, tensors, "platt_b", (n_classes,))
            used |= {"platt_a", "platt_b"}
        else:
            if prob.get("method") != "temperature":
                raise _bad(where, f"probability method {prob.get('method')!r}")
            out.temperature = _number(where, prob.get("temperature"), "temperature", positive=True)
    conf = section.get("conformal")
    if conf is not None:
        n = conf.get("n") if isinstance(conf, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _bad(where, f"'conformal.n' must be a positive integer, got {n!r}")
        scores = _tensor(where, tensors, "conformal_scores", (n,), low=-1e-6, high=1 + 1e-6)
        if np.any(np.diff(scores) < 0):
            raise _bad(where, "tensor conformal_scores must be sorted")
        out.conformal_scores = scores.astype(np.float64)
        used.add("conformal_scores")
    ood = section.get("ood")
    if ood is not None:
        out.ood = _ood_from_saved(ood, tensors, dim, where)
        out.ood_info = dict(ood)
        used.add("ood_bank")
    thr = section.get("thresholds")
    if thr is not None:
        if task != "multi-label":
            raise _bad(where, "'thresholds' belong to multi-label models only")
        out.thresholds = _tensor(where, tensors, "label_thresholds", (n_classes,), low=0, high=1)
        out.threshold_info = dict(thr) if isinstance(thr, dict) else {}
        used.add("label_thresholds")
    extra = sorted(set(tensors) - used)
    if extra:
        raise _bad(where, f"has unexpected tensors {extra}")
    out.info.update(
        {k: v for k, v in section.items() if k in ("fitted_on", "n", "nll_before", "nll_after")}
    )
    return out


def _ood_from_saved(ood, tensors, dim: int, where) -> KnnOOD:
    if not isinstance(ood, dict) or ood.get("method") != OOD_METHOD:
        raise _bad(where, f"ood method must be {OOD_METHOD!r}")
    k = ood.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _bad(where, f"'ood.k' must be a positive integer, got {k!r}")
    m = ood.get("bank")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise _bad(where, f"'ood.bank' must be a positive integer, got {m!r}")
    threshold = _number(where, ood.get("threshold"), "ood.threshold", low=0.0, high=2.0)
    bank = _tensor(where, tensors, "ood_bank", (m, dim), low=-1.001, high=1.001)
    return KnnOOD(bank, threshold, k)


# ----------------------------------------------------------------------------- fitting


def nll_of(logp: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(logp[np.arange(len(y)), y])) if len(y) else float("nan")


def fit_multiclass(
    decision: np.ndarray | None,
    y: np.ndarray | None,
    features: np.ndarray | None,
    *,
    seed: int,
    fitted_on: str,
) -> tuple[PostHoc, list[str]]:
    """Temperature and conformal scores from held-out decisions (None: no held-out data),
    and the OOD bank from the training features. Returns the parts and notes."""
    out, notes = PostHoc(task="multi-class"), []
    if decision is not None and len(decision):
        D = np.asarray(decision, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        t = fit_temperature(D, y)
        P = temperature_probabilities(D, t)
        out.temperature = t
        out.conformal_scores = nonconformity(P, y)
        out.info.update(
            {
                "fitted_on": fitted_on,
                "n": int(len(y)),
                "nll_before": nll_of(log_softmax(np.maximum(D, -1e8)), y),
                "nll_after": nll_of(np.log(np.clip(P, 1e-300, None)), y),
            }
        )
    else:
        notes.append(
            "no held-out images to calibrate on: probabilities are not calibrated and "
            "predict has no prediction sets"
        )
    _add_ood(out, features, seed, notes)
    return out, notes


def fit_multilabel(
    decision: np.ndarray | None,
    Y: np.ndarray | None,
    features: np.ndarray | None,
    *,
    seed: int,
    fitted_on: str,
) -> tuple[PostHoc, list[str]]:
    """Per-label Platt scaling and F1-best thresholds from held-out decisions, and the
    OOD bank. Without held-out data: no calibration, thresholds at probability 0.5."""
    # thresholds by F1 live with the multi-label head
    from tlearn.heads.multilabel import best_f1_thresholds

    out, notes = PostHoc(task="multi-label"), []
    if decision is not None and len(decision):
        D = np.asarray(decision, dtype=np.float64)
        Y = np.asarray(Y, dtype=bool)
        ab = [fit_platt(D[:, j], Y[:, j]) for j in range(D.shape[1])]
        out.platt_a = np.asarray([a for a, _ in ab], dtype=np.float64)
        out.platt_b = np.asarray([b for _, b in ab], dtype=np.float64)
        P = platt_probabilities(D, out.platt_a, out.platt_b)
        out.thresholds = best_f1_thresholds(P, Y)
        out.info.update({"fitted_on": fitted_on, "n": int(len(Y))})
        out.threshold_info = {"method": "best F1 per label on the held-out probabilities"}
    else:
        notes.append(
            "no held-out images to calibrate on: label probabilities are not calibrated "
            "and every label's threshold is 0.5"
        )
    _add_ood(out, features, seed, notes)
    return out, notes


def _add_ood(out: PostHoc, features, seed: int, notes: list[str]) -> None:
    fitted = None if features is None else fit_knn_ood(features, seed=seed)
    if fitted is None:
        notes.append("too few training images for an out-of-distribution threshold: no 'unknown'")
        return
    out.ood = fitted.scorer
    out.ood_info = fitted.info
