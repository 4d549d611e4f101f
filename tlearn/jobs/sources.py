"""Labelled features for fit: from images through the engine (the backbone opened at
most once) or from a features table (any format), with the validation split and class
checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.errors import DataError
from tlearn.core.options import RunOptions
from tlearn.core.spec import CutSpec
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.scan import scan_class_folders
from tlearn.data.skipped import SKIPPED_CSV, skipped_csv_bytes
from tlearn.data.split import stratified_split
from tlearn.features.engine import CutRequest, open_engine
from tlearn.features.table import is_features_table, read_table
from tlearn.heads.posthoc import CALIBRATION_FILE
from tlearn.modeldir import build_config, posthoc_bytes, save_model

# ----------------------------------------------------------------------------- fit


@dataclass
class LabelledFeatures:
    paths: list[str]
    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class FeatureSource:
    """Features for images or for a features table, with the backbone opened at most once."""

    def __init__(self, model, weights, layers, pool, run: RunOptions, seed: int):
        self.model, self.weights, self.layers, self.pool = model, weights, layers, pool
        self.run, self.seed = run, seed
        self.spec: CutSpec | None = None
        self.data_config: dict | None = None
        self.engine = None

    def _open(self):
        if self.engine is None:
            request = CutRequest(self.model, self.weights, self.layers, self.pool, self.seed)
            self.engine = open_engine(request, self.run)
            self.spec, self.data_config = self.engine.spec, self.engine.data_config

    def from_images(self, images: ImageSet, classes: list[str], stage: str) -> LabelledFeatures:
        self._open()
        feats = self.engine.extract(images.paths, self.run, stage=stage)
        y_all = np.asarray(images.labels, dtype=np.int64)
        # Re-map labels by name: `images` may list classes in another order.
        remap = np.asarray([classes.index(c) for c in images.classes], dtype=np.int64)
        return LabelledFeatures(
            paths=[images.paths[i] for i in feats.indices],
            X=feats.X,
            y=remap[y_all[feats.indices]] if len(feats.indices) else np.zeros(0, np.int64),
            classes=classes,
            skipped=list(images.skipped) + feats.skipped,
            warnings=list(images.warnings) + self._new_notes(),
        )

    def _new_notes(self) -> list[str]:
        """Engine notes (e.g. a backend fallback) not yet reported by an earlier call."""
        seen = getattr(self, "_notes_seen", 0)
        self._notes_seen = len(self.engine.notes)
        return self.engine.notes[seen:]

    def from_table(self, path) -> LabelledFeatures:
        table = read_table(path)
        spec = CutSpec.from_dict(table.meta["cut"])
        if self.spec is not None and self.spec != spec:
            raise DataError(f"{path} was extracted with another backbone/layer/pool than the rest")
        self.spec, self.data_config = spec, table.meta["data_config"]
        unlabeled = [i for i, lab in enumerate(table.labels) if lab is None]
        if unlabeled:
            raise DataError(
                f"{path}: row {unlabeled[0] + 1} ({table.paths[unlabeled[0]]}) has no label; "
                "fit needs a label on every row"
            )
        classes = sorted(set(table.labels))
        return LabelledFeatures(
            paths=table.paths,
            X=table.X,
            y=np.asarray([classes.index(lab) for lab in table.labels], dtype=np.int64),
            classes=classes,
            warnings=list(table.warnings),
        )


@dataclass
class FitResult:
    out_dir: str
    head: object  # heads.linear.LinearHead, or heads.multilabel.MultiLabelLinear
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
    posthoc: object = None  # heads.posthoc.PostHoc: calibration, prediction sets, "unknown"
    task: str = "multi-class"
    time_limited: list[str] = field(default_factory=list)  # what --time-limit cut short


def time_limit_info(run: RunOptions, stopped: list[str]) -> dict | None:
    """config.json's train.time_limit: the limit and what it cut short (None: no limit)."""
    if run.deadline is None:
        return None
    return {"seconds": run.deadline.seconds, "reached": bool(stopped), "stopped": stopped}


def save_fitted(
    out_dir,
    source,
    estimator,
    train,
    valid,
    posthoc,
    val_metrics,
    sweep,
    skipped,
    force,
    *,
    preset: dict | None = None,
    time_limit: dict | None = None,
    extra_config: dict | None = None,
) -> None:
    """The model directory of a fitted linear head (multi-class or multi-label): config
    (cut, classes or labels, head, calibration, layer_auto, the --preset recipe, and
    `extra_config`'s keys), head and calibration tensors, metrics, skipped.csv and the
    --layer auto sweep table."""
    extra_keys = {"layer_auto": sweep.summary()} if sweep else {}
    extra_keys.update(extra_config or {})
    if posthoc.task == "multi-label":
        extra_keys["task"] = "multi-label"
    if preset is not None:
        extra_keys["preset"] = preset
    train_info = {"n_images": int(len(train.y)), "n_val": int(len(valid.y)) if valid else 0}
    if time_limit is not None:
        train_info["time_limit"] = time_limit
    config = build_config(
        cut=source.spec,
        data_config=source.data_config,
        classes=train.classes,
        head=estimator.hyperparameters(),
        feature_dim=int(train.X.shape[1]),
        train=train_info,
        calibration=posthoc.to_config(),
        **extra_keys,
    )
    metrics = {"validation": val_metrics, "cv": config["head"]["cv"]}
    extra = {SKIPPED_CSV: skipped_csv_bytes(skipped), CALIBRATION_FILE: posthoc_bytes(posthoc)}
    if sweep:
        extra["sweep.json"] = sweep.json_bytes()
    save_model(
        out_dir, config, estimator.tensors(), metrics=metrics, force=force, extra_files=extra
    )


def drop_empty_classes(train: LabelledFeatures) -> LabelledFeatures:
    counts = np.bincount(train.y, minlength=len(train.classes))
    keep = [i for i, n in enumerate(counts) if n > 0]
    if len(keep) == len(train.classes):
        return train
    gone = [train.classes[i] for i, n in enumerate(counts) if n == 0]
    new_index = {old: new for new, old in enumerate(keep)}
    train.warnings.append(f"no usable images in class(es) {', '.join(gone)}: left out")
    train.classes = [train.classes[i] for i in keep]
    train.y = np.asarray([new_index[v] for v in train.y], dtype=np.int64)
    return train


def split_features(train: LabelledFeatures, fraction: float, seed: int):
    tr, va = stratified_split(train.y, fraction, seed)

    def pick(ix, skipped, warnings):
        return LabelledFeatures(
            paths=[train.paths[i] for i in ix],
            X=train.X[ix],
            y=train.y[ix],
            classes=train.classes,
            skipped=skipped,
            warnings=warnings,
        )

    return pick(tr, train.skipped, train.warnings), pick(va, [], [])


def val_from_images(source, images: ImageSet, classes: list[str]) -> LabelledFeatures:
    unknown = [c for c in images.classes if c not in classes]
    if unknown:
        raise DataError(
            f"validation class(es) {', '.join(unknown)} are not among the training classes "
            f"({', '.join(classes)})"
        )
    return source.from_images(images, classes, "extract val")


def val_features(source, val, classes: list[str]) -> LabelledFeatures:
    if is_features_table(val):
        table = source.from_table(val)
        unknown = [c for c in table.classes if c not in classes]
        if unknown:
            raise DataError(f"{val}: class(es) {', '.join(unknown)} not in training classes")
        table.y = np.asarray([classes.index(table.classes[v]) for v in table.y], np.int64)
        table.classes = classes
        return table
    if not Path(val).is_dir():
        raise DataError(f"--val {val}: not a folder of class sub-folders or a features table")
    return val_from_images(source, scan_class_folders(val), classes)
