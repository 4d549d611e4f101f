"""`tlearn evaluate`: metrics of a model on labelled images or a labelled features table:
accuracy and per-class metrics, the calibration of its probabilities (ECE, NLL, Brier),
the coverage of its prediction sets (--coverage), how many images its out-of-distribution
scorer flags; for a multi-label model mAP, micro/macro F1 and subset accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import scan_class_folders
from tlearn.data.skipped import require_some_read, strict_failure
from tlearn.features.table import is_features_table, read_table
from tlearn.heads.conformal import prediction_sets, quantile, set_metrics
from tlearn.heads.multilabel import label_matrix
from tlearn.jobs.decide import check_requests, decide
from tlearn.jobs.score import (
    ModelScorer,
    Outputs,
    refuse_nonfinite_outputs,
    refuse_tta_on_features,
    score_features,
    score_images,
)
from tlearn.modeldir import load_model
from tlearn.report.calibration import multiclass_calibration, multilabel_calibration
from tlearn.report.metrics import classification_metrics
from tlearn.report.multilabel import multilabel_metrics

# ----------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateResult:
    metrics: dict
    skipped: list[Skipped]
    warnings: list[str]
    # Per image, for plots (worst mistakes): paths, true and predicted class ids, scores.
    paths: list[str] = field(default_factory=list)
    y_true: np.ndarray | None = None
    y_pred: np.ndarray | None = None
    scores: np.ndarray | None = None
    score_kind: str = "svm margin"
    probabilities: np.ndarray | None = None
    reliability: dict | None = None  # the bins of the reliability diagram
    task: str = "multi-class"


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    *,
    labels_csv: str | Path | None = None,
    strict: bool = False,
    tta: str | None = None,
    run: RunOptions | None = None,
    coverage: float | None = None,
) -> EvaluateResult:
    run = run or RunOptions()
    saved = load_model(model_dir)
    scorer = ModelScorer(saved)
    notes = check_requests(scorer, coverage, reject=False)
    classes = saved.classes
    multi = scorer.multi_label
    tta = tta or ("none" if is_features_table(data) else saved.tta)  # None: the model's choice
    if is_features_table(data):
        table = read_table(data)
        refuse_tta_on_features(tta)
        truth = _table_truth(table.labels, classes, multi, data)
        outputs = score_features(scorer, table.X, run.batch_size)
        skipped, warnings = [], list(table.warnings)
        paths = list(table.paths)
    else:
        images = _labelled_images(data, labels_csv, classes, multi)
        scored = score_images(scorer, images, tta, run, "evaluate")
        outputs = scored.outputs
        skipped = images.skipped + scored.skipped
        warnings = list(images.warnings) + scored.notes
        paths = [images.paths[i] for i in scored.indices]
        names = [images.classes[images.labels[i]] for i in scored.indices]
        truth = _table_truth(names, classes, multi, labels_csv or data)
    if strict and skipped:
        raise strict_failure(skipped)
    require_some_read(len(paths), skipped, labels_csv or data)
    outputs = refuse_nonfinite_outputs(outputs, paths, model_dir)
    if multi:
        res = _multilabel_result(scorer, outputs, truth, paths)
    else:
        res = _multiclass_result(scorer, outputs, truth, paths, coverage)
    m = res.metrics
    m["model"] = str(model_dir)
    m["skipped"] = len(skipped)
    if tta != "none":
        m["tta"] = tta
    _ood_metrics(m, scorer, outputs)
    res.skipped, res.warnings = skipped, list(warnings) + notes
    return res


def _labelled_images(data, labels_csv, classes: list[str], multi: bool) -> ImageSet:
    if labels_csv is not None:
        images = read_labels_csv(labels_csv, classes=None if multi else classes, multi_label=multi)
    elif multi:
        raise UsageError(
            "a multi-label model is evaluated on a labels CSV (--labels FILE, labels joined "
            "by ';') or a features CSV; class folders hold one label per image"
        )
    else:
        if not Path(data).is_dir():
            raise DataError(f"{data}: not a folder of class sub-folders or a features table")
        images = scan_class_folders(data, classes=classes)
    if len(images) == 0:
        raise DataError(f"no images found in {data}")
    return images


def _table_truth(names, classes: list[str], multi: bool, where):
    """Class ids (n,), or for a multi-label model the (n, L) label matrix."""
    if multi:
        return label_matrix(names, classes)[0]
    missing = [i for i, lab in enumerate(names) if lab is None]
    if missing:
        raise DataError(f"{where}: row {missing[0] + 2} has no label; evaluate needs labels")
    unknown = sorted({lab for lab in names if lab not in classes})
    if unknown:
        raise DataError(f"{where}: class(es) {', '.join(unknown)} are not in the model")
    return np.asarray([classes.index(lab) for lab in names], dtype=np.int64)


def _multiclass_result(scorer, outputs: Outputs, y, paths, coverage) -> EvaluateResult:
    classes = scorer.saved.classes
    raw, P = outputs.raw, outputs.probabilities
    y_pred = raw.argmax(axis=1) if len(raw) else np.zeros(0, dtype=np.int64)
    metrics = classification_metrics(y, y_pred, classes)
    metrics["calibrated"] = scorer.calibrated
    reliability = None
    if P is not None:
        cal = multiclass_calibration(P, y)
        reliability = cal.pop("reliability", None)
        metrics.update(cal)
    else:
        metrics.update({"ece": None, "nll": None, "brier": None})
    if coverage is not None:
        q = quantile(scorer.posthoc.conformal_scores, coverage)
        sets = set_metrics(prediction_sets(P, q), y, classes)
        metrics["coverage_target"] = coverage
        for key in ("coverage", "mean_set_size", "empty_sets"):
            metrics[key] = sets[key]
        for c, row in sets["per_class"].items():
            if c in metrics.get("per_class", {}):
                metrics["per_class"][c]["coverage"] = row["coverage"]
                metrics["per_class"][c]["mean_set_size"] = row["mean_set_size"]
    return EvaluateResult(
        metrics=metrics,
        skipped=[],
        warnings=[],
        paths=paths,
        y_true=y,
        y_pred=y_pred,
        scores=raw,
        score_kind=scorer.kind,
        probabilities=P,
        reliability=reliability,
    )


def _multilabel_result(scorer, outputs: Outputs, Y, paths) -> EvaluateResult:
    labels = scorer.saved.classes
    preds, _ = decide(paths, outputs, scorer)
    Z = np.asarray([[lab in p.labels for lab in labels] for p in preds], dtype=bool)
    Z = Z.reshape(len(preds), len(labels))
    P = outputs.probabilities
    metrics = multilabel_metrics(Y, P, Z, labels)
    metrics["task"] = "multi-label"
    metrics["calibrated"] = scorer.calibrated
    cal = multilabel_calibration(P, Y)
    reliability = cal.pop("reliability", None)
    metrics.update(cal)
    return EvaluateResult(
        metrics=metrics,
        skipped=[],
        warnings=[],
        paths=paths,
        scores=outputs.raw,
        score_kind=scorer.kind,
        probabilities=P,
        reliability=reliability,
        task="multi-label",
    )


def _ood_metrics(m: dict, scorer: ModelScorer, outputs: Outputs) -> None:
    if outputs.ood is None:
        m["ood_flagged"] = None
        return
    flags = scorer.ood.flags(outputs.ood)
    m["ood_flagged"] = int(flags.sum())
    m["ood_flagged_fraction"] = float(flags.mean()) if len(flags) else None
    m["ood_threshold"] = float(scorer.ood.threshold)
