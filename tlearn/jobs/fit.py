"""`tlearn fit --head svm|logreg`: features (images, or a features table in any format) ->
linear head (C by cross-validation) -> model directory, validated on --val / --val-split /
val/."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tlearn.core.errors import DataError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL
from tlearn.data.imageset import ImageSet
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset
from tlearn.data.skipped import require_some_read, strict_failure
from tlearn.features.table import is_features_table
from tlearn.heads.linear import LinearHead, parse_C
from tlearn.heads.posthoc import fit_multiclass
from tlearn.jobs.fit_multilabel import fit_multilabel
from tlearn.jobs.fit_source import fit_source
from tlearn.jobs.sources import (
    FitResult,
    LabelledFeatures,
    drop_empty_classes,
    save_fitted,
    split_features,
    time_limit_info,
    val_features,
    val_from_images,
)
from tlearn.report.metrics import classification_metrics


def fit(
    data: str | Path,
    out_dir: str | Path,
    *,
    head: str = "svm",
    C: str | float = "auto",
    val: str | Path | None = None,
    val_split: float | None = None,
    seed: int = 0,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers: str | Sequence[str] | None = None,
    pool: str = "avg",
    labels_csv: str | Path | None = None,
    force: bool = False,
    strict: bool = False,
    run: RunOptions | None = None,
    multi_label: bool = False,
    preset: dict | None = None,
) -> FitResult:
    """Fit a linear head; `preset`: the --preset recipe to record in config.json. With
    run.deadline (--time-limit), the layer sweep and the C grid stop early once it
    passes, keeping the best so far (FitResult.time_limited says what they left out)."""
    if multi_label:  # label sets: one-vs-rest heads (jobs.fit_multilabel)
        return fit_multilabel(**{k: v for k, v in locals().items() if k != "multi_label"})
    t0 = time.perf_counter()
    run = run or RunOptions()
    C_value = parse_C(C)
    # validates --head early; keeps the out-of-fold decisions to calibrate on
    estimator = LinearHead(kind=head, C=C_value, seed=seed, keep_oof=True, deadline=run.deadline)
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
    train, valid = _train_and_val(source, data, labels_csv, val, val_split, seed)
    skipped = train.skipped + (valid.skipped if valid else [])
    if strict and skipped:
        raise strict_failure(skipped)
    sweep_result = None
    if auto:
        train, valid, sweep_result = source.choose(train, valid)
        if sweep_result.stopped and estimator.C is None:
            # out of time: the sweep has searched the C grid on the chosen cut already
            estimator.C = sweep_result.chosen.C
    estimator.fit(train.X, train.y, train.classes, progress=run.bar("cross-validate C"))
    oof = estimator.oof_decision_
    posthoc, notes = fit_multiclass(
        oof,
        train.y,
        train.X,
        seed=seed,
        fitted_on="out-of-fold decisions of the cross-validation of C",
    )
    val_metrics = None
    if valid is not None and len(valid.y):
        val_metrics = classification_metrics(valid.y, estimator.predict(valid.X), train.classes)

    stopped = (sweep_result.stopped if sweep_result else []) + [
        n for n in estimator.notes_ if n.startswith("time limit reached")
    ]
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
        time_limit=time_limit_info(run, stopped),
    )
    return FitResult(
        out_dir=str(out_dir),
        head=estimator,
        classes=train.classes,
        n_train=int(len(train.y)),
        n_val=int(len(valid.y)) if valid else 0,
        val_metrics=val_metrics,
        cut=source.spec,
        feature_dim=int(train.X.shape[1]),
        skipped=skipped,
        warnings=train.warnings
        + estimator.notes_
        + notes
        + (valid.warnings if valid else [])
        + (sweep_result.stopped if sweep_result else []),
        seconds=time.perf_counter() - t0,
        sweep=sweep_result,
        posthoc=posthoc,
        time_limited=stopped,
    )


def _train_and_val(source, data, labels_csv, val, val_split, seed):
    """Training features (images or a features table) and the validation features:
    --val, --val-split, DATA/val, or none."""
    val_images: ImageSet | None = None
    if is_features_table(data):
        train = source.from_table(data)
    else:
        if labels_csv is not None:
            train_images = read_labels_csv(labels_csv)
        else:
            if not Path(data).is_dir():
                raise DataError(
                    f"{data} is not a folder of class sub-folders or a features table "
                    "(.csv, .parquet, .npy) from tlearn extract"
                )
            train_images, val_images = resolve_dataset(data)
        if len(train_images) == 0:
            raise DataError(f"no images found in {data}")
        train = source.from_images(train_images, train_images.classes, "extract train")
        require_some_read(len(train.paths), train.skipped, labels_csv or data)
    train = drop_empty_classes(train)
    if len(train.classes) < 2:
        raise DataError(
            f"fit needs at least two classes with usable images; found "
            f"{len(train.classes)} ({', '.join(train.classes) or 'none'})"
        )

    valid: LabelledFeatures | None = None
    if val is not None:
        valid = val_features(source, val, train.classes)
    elif val_split is not None:
        train, valid = split_features(train, val_split, seed)
    elif val_images is not None:
        valid = val_from_images(source, val_images, train.classes)

    return train, valid
