"""`tlearn fit --multi-label --head svm|logreg`: images with sets of labels (a labels CSV
whose label cells hold labels joined by ';', or a features CSV extracted from one) ->
one-vs-rest linear heads (C by cross-validated mAP) -> per-label Platt calibration and
F1-best thresholds from the out-of-fold decisions, the "unknown" scorer -> model
directory, validated on --val FILE / --val-split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL, CutSpec, is_auto_layer
from tlearn.data.labels import read_labels_csv
from tlearn.data.skipped import require_some_read, strict_failure
from tlearn.features.table import is_features_table, read_table, sidecar_path
from tlearn.heads.calibration import sigmoid
from tlearn.heads.linear import parse_C
from tlearn.heads.multilabel import MultiLabelLinear, label_matrix
from tlearn.heads.posthoc import fit_multilabel as fit_posthoc
from tlearn.jobs.fit_source import fit_source
from tlearn.jobs.sources import (
    FeatureSource,
    FitResult,
    LabelledFeatures,
    save_fitted,
    split_features,
)
from tlearn.report.multilabel import multilabel_metrics


def _features_table(source: FeatureSource, path) -> LabelledFeatures:
    """A features CSV whose label column holds label sets (empty: no label); y indexes
    the distinct sets, as for images."""
    if is_auto_layer(source.layers):
        source.from_csv(path)  # --layer auto refuses a features CSV with its message
    table = read_table(path)
    spec = CutSpec.from_dict(table.meta["cut"])
    if source.spec is not None and source.spec != spec:
        raise DataError(f"{path} was extracted with another backbone/layer/pool than the rest")
    source.spec, source.data_config = spec, table.meta["data_config"]
    names = [lab or "" for lab in table.labels]
    sets = sorted(set(names))
    y = np.asarray([sets.index(n) for n in names], dtype=np.int64)
    return LabelledFeatures(paths=table.paths, X=table.X, y=y, classes=sets)


def _labelled(source: FeatureSource, path, stage: str, *, labels_csv=False) -> LabelledFeatures:
    """Features of a labels CSV (always for --labels; a .csv without a features sidecar
    too) or of a features table from tlearn extract --multi-label."""
    labels_only = Path(path).suffix.lower() == ".csv" and not sidecar_path(path).is_file()
    if not labels_csv and not labels_only and is_features_table(path):
        return _features_table(source, path)
    if not Path(path).is_file():
        raise UsageError(
            f"{path}: --multi-label reads images and their labels from a CSV (path,label "
            "with labels joined by ';'), or a features CSV; folders hold one class per image"
        )
    images = read_labels_csv(path, multi_label=True)
    return source.from_images(images, images.classes, stage)


def _to_matrix(part: LabelledFeatures, vocabulary=None) -> tuple[np.ndarray, list[str]]:
    names = [part.classes[i] for i in part.y]
    return label_matrix(names, vocabulary)


def _validation(estimator, posthoc, valid: LabelledFeatures | None, labels) -> dict | None:
    if valid is None or not len(valid.y):
        return None
    D = estimator.decision_function(valid.X)
    P = posthoc.probabilities(D)
    P = sigmoid(D) if P is None else P
    thr = posthoc.thresholds if posthoc.thresholds is not None else np.full(len(labels), 0.5)
    m = multilabel_metrics(valid.y, P, P >= thr, labels)
    m["task"] = "multi-label"
    return m


def fit_multilabel(
    data,
    out_dir,
    *,
    head: str = "svm",
    C: str | float = "auto",
    val=None,
    val_split: float | None = None,
    seed: int = 0,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers=None,
    pool: str = "avg",
    labels_csv=None,
    force: bool = False,
    strict: bool = False,
    run: RunOptions | None = None,
    preset: dict | None = None,
) -> FitResult:
    t0 = time.perf_counter()
    run = run or RunOptions()
    C_value = parse_C(C)
    estimator = MultiLabelLinear(kind=head, C=C_value, seed=seed)  # validates --head early
    out_dir, source, auto = fit_source(
        out_dir,
        data,
        model=model,
        weights=weights,
        layers=layers,
        pool=pool,
        run=run,
        seed=seed,
        head=head,
        C=C_value,
        val=val,
        val_split=val_split,
        force=force,
    )
    if labels_csv is not None:
        train = _labelled(source, labels_csv, "extract train", labels_csv=True)
    else:
        train = _labelled(source, data, "extract train")
    require_some_read(len(train.paths), train.skipped, labels_csv or data)
    valid = None
    if val is not None:
        valid = _labelled(source, val, "extract val")
    elif val_split is not None:
        train, valid = split_features(train, val_split, seed)
    skipped = train.skipped + (valid.skipped if valid else [])
    if strict and skipped:
        raise strict_failure(skipped)
    Y, labels = _to_matrix(train)
    if len(labels) < 2:
        raise DataError(
            f"--multi-label needs at least two labels in the training data; found "
            f"{len(labels)} ({', '.join(labels) or 'none'}): for one yes/no label fit two "
            "classes instead"
        )
    train.y, train.classes = Y, labels
    if valid is not None:
        valid.y, valid.classes = _to_matrix(valid, labels)[0], labels
    sweep_result = None
    if auto:
        train, valid, sweep_result = source.choose(train, valid)
    estimator.fit(train.X, train.y, labels)
    posthoc, notes = fit_posthoc(
        estimator.oof_decision_,
        train.y,
        train.X,
        seed=seed,
        fitted_on="out-of-fold decisions of the cross-validation of C",
    )
    val_metrics = _validation(estimator, posthoc, valid, labels)
    save_fitted(
        out_dir,
        source,
        estimator,
        train,
        valid,
        posthoc,
        val_metrics,
        sweep_result,
        skipped,
        force,
        preset=preset,
    )
    return FitResult(
        out_dir=str(out_dir),
        head=estimator,
        classes=labels,
        n_train=int(len(train.y)),
        n_val=int(len(valid.y)) if valid else 0,
        val_metrics=val_metrics,
        cut=source.spec,
        feature_dim=int(train.X.shape[1]),
        skipped=skipped,
        warnings=train.warnings + estimator.notes_ + notes + (valid.warnings if valid else []),
        seconds=time.perf_counter() - t0,
        sweep=sweep_result,
        posthoc=posthoc,
        task="multi-label",
    )
