"""`tlearn fit --head svm|logreg`: features (images, or a features table in any format) ->
linear head (C by cross-validation) -> model directory, validated on --val / --val-split /
val/."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tlearn.cache.remembered import check_layers
from tlearn.cache.store import cache_root
from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL, CutSpec, is_auto_layer
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset
from tlearn.data.skipped import SKIPPED_CSV, skipped_csv_bytes, strict_failure
from tlearn.data.split import check_val_split
from tlearn.features.table import is_features_table
from tlearn.heads.linear import LinearHead, parse_C
from tlearn.jobs.sources import (
    FeatureSource,
    LabelledFeatures,
    drop_empty_classes,
    split_features,
    val_features,
    val_from_images,
)
from tlearn.modeldir import build_config, save_model
from tlearn.report.metrics import classification_metrics


@dataclass
class FitResult:
    out_dir: str
    head: LinearHead
    classes: list[str]
    n_train: int
    n_val: int
    val_metrics: dict | None
    cut: CutSpec
    feature_dim: int
    skipped: list[Skipped]
    warnings: list[str]
    seconds: float
    sweep: object | None = None  # sweep.SweepResult when fitted with --layer auto


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
) -> FitResult:
    t0 = time.perf_counter()
    run = run or RunOptions()
    C_value = parse_C(C)
    estimator = LinearHead(kind=head, C=C_value, seed=seed)  # validates --head early
    if val is not None and val_split is not None:
        raise UsageError("use either --val DIR or --val-split, not both")
    if val_split is not None:
        check_val_split(val_split)
    auto = is_auto_layer(layers)
    if not auto and not is_features_table(data):
        check_layers(cache_root(), model, layers)  # before torch loads, when known
    out_dir = check_output_parent(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; choose another -o or pass --force")
    if auto:
        # --layer auto loads the backbone (torch): only then
        from tlearn.jobs.layer_auto import AutoLayerSource

        # one pass extracts every candidate layer; `choose` keeps the best (CV on train)
        source = AutoLayerSource(model, weights, pool, run, seed, head=head, C=C_value)
    else:
        source = FeatureSource(model, weights, layers, pool, run, seed)

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

    skipped = train.skipped + (valid.skipped if valid else [])
    if strict and skipped:
        raise strict_failure(skipped)
    sweep_result = None
    if auto:
        train, valid, sweep_result = source.choose(train, valid)
    estimator.fit(train.X, train.y, train.classes, progress=run.bar("cross-validate C"))
    val_metrics = None
    if valid is not None and len(valid.y):
        val_metrics = classification_metrics(valid.y, estimator.predict(valid.X), train.classes)

    spec, data_config = source.spec, source.data_config
    config = build_config(
        cut=spec,
        data_config=data_config,
        classes=train.classes,
        head=estimator.hyperparameters(),
        feature_dim=int(train.X.shape[1]),
        train={"n_images": int(len(train.y)), "n_val": int(len(valid.y)) if valid else 0},
        **({"layer_auto": sweep_result.summary()} if sweep_result else {}),
    )
    metrics = {"validation": val_metrics, "cv": config["head"]["cv"]}
    extra = {SKIPPED_CSV: skipped_csv_bytes(skipped)}
    if sweep_result:
        extra["sweep.json"] = sweep_result.json_bytes()
    save_model(
        out_dir, config, estimator.tensors(), metrics=metrics, force=force, extra_files=extra
    )
    return FitResult(
        out_dir=str(out_dir),
        head=estimator,
        classes=train.classes,
        n_train=int(len(train.y)),
        n_val=int(len(valid.y)) if valid else 0,
        val_metrics=val_metrics,
        cut=spec,
        feature_dim=int(train.X.shape[1]),
        skipped=skipped,
        warnings=train.warnings + estimator.notes_ + (valid.warnings if valid else []),
        seconds=time.perf_counter() - t0,
        sweep=sweep_result,
    )
