"""`tlearn evaluate`: metrics of a model on labelled images or a labelled features table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.errors import DataError
from tlearn.core.options import RunOptions
from tlearn.data.imageset import Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import scan_class_folders
from tlearn.data.skipped import strict_failure
from tlearn.features.table import is_features_table, read_table
from tlearn.jobs.score import (
    ModelScorer,
    refuse_nonfinite,
    refuse_tta_on_features,
    score_images,
)
from tlearn.modeldir import load_model
from tlearn.report.metrics import classification_metrics

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


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    *,
    labels_csv: str | Path | None = None,
    strict: bool = False,
    tta: str = "none",
    run: RunOptions | None = None,
) -> EvaluateResult:
    run = run or RunOptions()
    saved = load_model(model_dir)
    scorer = ModelScorer(saved)
    classes = saved.classes
    if is_features_table(data):
        table = read_table(data)
        missing = [i for i, lab in enumerate(table.labels) if lab is None]
        if missing:
            raise DataError(
                f"{data}: row {missing[0] + 1} ({table.paths[missing[0]]}) has no label; "
                "evaluate needs labels"
            )
        unknown = sorted({lab for lab in table.labels if lab not in classes})
        if unknown:
            raise DataError(f"{data}: class(es) {', '.join(unknown)} are not in the model")
        refuse_tta_on_features(tta)
        y = np.asarray([classes.index(lab) for lab in table.labels], dtype=np.int64)
        scores = scorer.scores(table.X)
        skipped, warnings = [], list(table.warnings)
        paths = list(table.paths)
    else:
        if labels_csv is not None:
            images = read_labels_csv(labels_csv, classes=classes)
        else:
            if not Path(data).is_dir():
                raise DataError(f"{data}: not a folder of class sub-folders or a features table")
            images = scan_class_folders(data, classes=classes)
        if len(images) == 0:
            raise DataError(f"no images found in {data}")
        remap = np.asarray([classes.index(c) for c in images.classes], dtype=np.int64)
        scored = score_images(scorer, images, tta, run, "evaluate")
        indices, scores = scored.indices, scored.scores
        skipped, notes = images.skipped + scored.skipped, scored.notes
        y = remap[np.asarray(images.labels, dtype=np.int64)[indices]]
        warnings = list(images.warnings) + notes
        paths = [images.paths[i] for i in indices]
    if strict and skipped:
        raise strict_failure(skipped)
    scores = refuse_nonfinite(scores, paths, model_dir)
    y_pred = scores.argmax(axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
    metrics = classification_metrics(y, y_pred, classes)
    metrics["model"] = str(model_dir)
    metrics["skipped"] = len(skipped)
    if tta != "none":
        metrics["tta"] = tta
    return EvaluateResult(
        metrics=metrics,
        skipped=skipped,
        warnings=list(warnings),
        paths=paths,
        y_true=y,
        y_pred=y_pred,
        scores=scores,
        score_kind=scorer.kind,
    )
