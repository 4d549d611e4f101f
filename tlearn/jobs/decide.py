"""From a model's outputs to what predict reports for each image: the class (or the set
of labels of a multi-label model), its calibrated probability, the conformal prediction
set at --coverage, the out-of-distribution score and whether the image is "unknown"
(--reject reports `unknown` as the prediction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlearn.core.errors import UsageError
from tlearn.core.labelsets import join_labels
from tlearn.heads.conformal import check_coverage, max_coverage, prediction_sets, quantile
from tlearn.jobs.score import ModelScorer, Outputs

UNKNOWN = "unknown"


@dataclass
class Prediction:
    path: str
    label: str  # the class; multi-label: the labels joined by ';'; `unknown` with --reject
    score: float  # the head's score of that class (margin or probability)
    scores: dict[str, float]
    probability: float | None = None  # calibrated probability of `label`
    probabilities: dict[str, float] | None = None
    set: list[str] | None = None  # the conformal prediction set (--coverage)
    ood_score: float | None = None
    unknown: bool | None = None
    labels: list[str] | None = None  # multi-label: the predicted labels


@dataclass
class Decisions:
    """How predictions were made, for the renderer and the notes."""

    multi_label: bool = False
    probability: bool = False  # a probability per image
    calibrated: bool = False
    set: bool = False
    ood: bool = False
    notes: list[str] | None = None


def check_requests(scorer: ModelScorer, coverage: float | None, reject: bool) -> list[str]:
    """Refuse --coverage / --reject a model cannot honour; notes about what it lacks."""
    check_coverage(coverage)
    posthoc, notes = scorer.posthoc, []
    if coverage is not None:
        if scorer.multi_label:
            raise UsageError("--coverage gives sets of classes; a multi-label model has none")
        if posthoc is None or posthoc.conformal_scores is None:
            raise UsageError(
                "--coverage: this model has no conformal calibration (fitted by an older "
                "tlearn, or without held-out images); refit it with this version"
            )
        n = len(posthoc.conformal_scores)
        if coverage > max_coverage(n):
            notes.append(
                f"--coverage {coverage} needs more than the {n} calibration images the model "
                f"has (at most {max_coverage(n):.3f}): every set holds every class"
            )
    if reject and scorer.ood is None:
        raise UsageError(
            "--reject: this model has no out-of-distribution scorer (fitted by an older "
            "tlearn, or on fewer than 10 images); refit it with this version"
        )
    if reject and UNKNOWN in scorer.saved.classes:
        raise UsageError(f"--reject prints '{UNKNOWN}', which is also a class of this model")
    if posthoc is None:
        notes.append(
            "this model has no calibration (made by an older tlearn): no calibrated "
            "probabilities, prediction sets or 'unknown'; refit it to get them"
        )
    return notes


def decide(
    paths: list[str],
    outputs: Outputs,
    scorer: ModelScorer,
    *,
    coverage: float | None = None,
    reject: bool = False,
) -> tuple[list[Prediction], Decisions]:
    classes = scorer.saved.classes
    how = Decisions(
        multi_label=scorer.multi_label,
        probability=outputs.probabilities is not None,
        calibrated=scorer.calibrated,
        set=coverage is not None,
        ood=outputs.ood is not None,
    )
    if scorer.multi_label:
        preds = _multilabel(paths, outputs, scorer, classes)
    else:
        sets = None
        if coverage is not None:
            q = quantile(scorer.posthoc.conformal_scores, coverage)
            sets = prediction_sets(outputs.probabilities, q)
        preds = _multiclass(paths, outputs, classes, sets)
    if outputs.ood is not None:
        flags = scorer.ood.flags(outputs.ood)
        for p, s, f in zip(preds, outputs.ood, flags, strict=True):
            p.ood_score, p.unknown = float(s), bool(f)
            if reject and f:
                p.label = UNKNOWN
                p.labels = [] if p.labels is not None else None
    return preds, how


def _multiclass(paths, outputs: Outputs, classes, sets) -> list[Prediction]:
    raw, P = outputs.raw, outputs.probabilities
    best = raw.argmax(axis=1) if len(raw) else np.zeros(0, dtype=np.int64)
    preds = []
    for i, (path, k) in enumerate(zip(paths, best, strict=True)):
        p = Prediction(
            path=path,
            label=classes[int(k)],
            score=float(raw[i, k]),
            scores={c: float(v) for c, v in zip(classes, raw[i], strict=True)},
        )
        if P is not None:
            p.probability = float(P[i, k])
            p.probabilities = {c: float(v) for c, v in zip(classes, P[i], strict=True)}
        if sets is not None:
            p.set = [c for c, inside in zip(classes, sets[i], strict=True) if inside]
        preds.append(p)
    return preds


def _multilabel(paths, outputs: Outputs, scorer: ModelScorer, labels) -> list[Prediction]:
    P = outputs.probabilities
    posthoc = scorer.posthoc
    thresholds = (
        posthoc.thresholds
        if posthoc is not None and posthoc.thresholds is not None
        else np.full(len(labels), 0.5)
    )
    preds = []
    for i, path in enumerate(paths):
        chosen = [lab for lab, p, t in zip(labels, P[i], thresholds, strict=True) if p >= t]
        preds.append(
            Prediction(
                path=path,
                label=join_labels(chosen),
                score=float(P[i].max()),
                scores={c: float(v) for c, v in zip(labels, outputs.raw[i], strict=True)},
                probabilities={c: float(v) for c, v in zip(labels, P[i], strict=True)},
                labels=chosen,
            )
        )
    return preds
