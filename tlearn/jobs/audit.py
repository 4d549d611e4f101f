"""`tlearn audit`: what is wrong with a labelled image set before a model is fitted on it.

Duplicates (exact and near, leakage across train/val first), likely label errors
(confident learning on out-of-fold probabilities), outliers (k-NN distance to the
image's own class), class balance and unreadable files. Features come from the engine
through the feature cache, like every other command: auditing images that were fitted,
evaluated or audited before runs no backbone. The report is written by
jobs.audit_write; the findings themselves are computed by jobs.audit_dups and
jobs.audit_labels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.cache.store import hash_files
from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL, is_auto_layer
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset, scan_class_folders
from tlearn.data.skipped import require_some_read
from tlearn.heads.linear import parse_C
from tlearn.jobs.audit_dups import MAX_PAIRS, Pair, find_duplicates
from tlearn.jobs.audit_labels import (
    LabelIssue,
    Outlier,
    fold_of,
    knn_distances,
    label_issues,
    out_of_fold,
    outliers,
    usable_folds,
)
from tlearn.jobs.audit_write import write_report
from tlearn.jobs.sources import FeatureSource, drop_empty_classes, val_from_images

DEFAULT_THRESHOLD = 0.83  # cosine similarity of pooled features (docs/benchmarks.md)
DEFAULT_NEIGHBOURS = 5


@dataclass
class AuditResult:
    """Every finding, with row numbers into `paths` (train images first, then val)."""

    out_dir: Path
    paths: list[str]
    splits: list[str]  # "train" or "val" per row
    labels: np.ndarray  # class index per row
    classes: list[str]
    duplicates: list[Pair]
    duplicates_truncated: bool
    threshold: float
    issues: list[LabelIssue]
    outliers: list[Outlier]
    unreadable: list[Skipped]
    balance: list[dict]
    cv: dict | None  # folds and C of the out-of-fold fit; None when it could not run
    engine: dict
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def leakage(self) -> int:
        return sum(self.splits[p.a] != self.splits[p.b] for p in self.duplicates)


def audit(
    data: str | Path,
    out_dir: str | Path,
    *,
    val: str | Path | None = None,
    labels_csv: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers: str | Sequence[str] | None = None,
    pool: str = "avg",
    threshold: float = DEFAULT_THRESHOLD,
    neighbours: int = DEFAULT_NEIGHBOURS,
    folds: int = 5,
    C: str | float = "auto",
    seed: int = 0,
    max_pairs: int = MAX_PAIRS,
    run: RunOptions | None = None,
) -> AuditResult:
    """Audit DATA (class folders, DATA/train + DATA/val, or --labels) and `val`; write
    the report into `out_dir` (CSVs, contact sheets, audit.json)."""
    t0 = time.perf_counter()
    run = run or RunOptions()
    _check_options(threshold, neighbours, folds, max_pairs)
    C_value = parse_C(C)
    if is_auto_layer(layers):
        raise UsageError("audit takes a layer name or index, not --layer auto (see tlearn sweep)")
    train_images, val_images = _images(data, val, labels_csv)
    source = FeatureSource(model, weights, layers, pool, run, seed)
    train = drop_empty_classes(source.from_images(train_images, train_images.classes, "extract"))
    classes = train.classes
    parts = [train]
    if val_images is not None:
        parts.append(val_from_images(source, val_images, classes))
    paths = [p for part in parts for p in part.paths]
    names = ("train", "val")[: len(parts)]
    splits = [s for part, s in zip(parts, names, strict=True) for _ in part.paths]
    X = np.concatenate([part.X for part in parts]) if paths else np.zeros((0, 1), np.float32)
    y = np.concatenate([part.y for part in parts]).astype(np.int64)
    unreadable = [s for part in parts for s in part.skipped]
    warnings = [w for part in parts for w in part.warnings]
    require_some_read(len(paths), unreadable, labels_csv or data)
    if len(paths) < 2:
        raise DataError(f"audit needs at least two readable images; found {len(paths)}")

    dups, truncated = find_duplicates(X, hash_files(paths), splits, threshold, limit=max_pairs)
    if truncated:
        warnings.append(
            f"more than {max_pairs} duplicate pairs at --threshold {threshold:g}: kept the "
            "most similar; raise --threshold"
        )
    oof = out_of_fold(X, y, classes, C=C_value, folds=folds, seed=seed)
    if oof is None:
        warnings.append("a class has fewer than two images: no label issues (nothing to CV)")
        n_folds = usable_folds(y, folds)
        fold = fold_of(y, n_folds, seed) if n_folds >= 2 else np.arange(len(y))
        issues, cv = [], None
    else:
        warnings += oof.notes
        issues, fold = label_issues(y, oof), oof.folds
        cv = {"folds": oof.n_folds, "C": oof.C, "head": "logreg"}
    found_outliers = outliers(y, knn_distances(X, y, fold, neighbours))
    result = AuditResult(
        out_dir=Path(out_dir),
        paths=paths,
        splits=splits,
        labels=y,
        classes=classes,
        duplicates=dups,
        duplicates_truncated=truncated,
        threshold=threshold,
        issues=issues,
        outliers=found_outliers,
        unreadable=unreadable,
        balance=class_balance(y, splits, classes),
        cv=cv,
        engine=source.engine.summary() if source.engine is not None else {},
        warnings=warnings,
    )
    result.files = write_report(result)
    result.seconds = time.perf_counter() - t0
    return result


def _check_options(threshold: float, neighbours: int, folds: int, max_pairs: int) -> None:
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold {threshold}: a cosine similarity in (0, 1], e.g. 0.83")
    if neighbours < 1:
        raise UsageError(f"--neighbours {neighbours}: must be at least 1, e.g. 5")
    if folds < 2:
        raise UsageError(f"--folds {folds}: must be at least 2, e.g. 5")
    if max_pairs < 1:
        raise UsageError(f"--max-pairs {max_pairs}: must be at least 1")


def _images(data, val, labels_csv) -> tuple[ImageSet, ImageSet | None]:
    """(train, val or None): DATA as class folders or DATA/train + DATA/val, or --labels."""
    if labels_csv is not None:
        train, val_images = read_labels_csv(labels_csv), None
    else:
        if not Path(data).is_dir():
            raise DataError(f"{data} is not a folder of class sub-folders")
        train, val_images = resolve_dataset(data)
    if val is not None:
        if val_images is not None:
            raise UsageError(f"{data} has train/ and val/ folders already; drop --val {val}")
        val_images = scan_class_folders(val)
    return train, val_images


def class_balance(y: np.ndarray, splits: Sequence[str], classes: list[str]) -> list[dict]:
    """Images per class and split, and each class's share of all images."""
    split_arr = np.asarray(splits)
    rows = []
    for c, name in enumerate(classes):
        mine = y == c
        rows.append(
            {
                "class": name,
                "train": int(np.sum(mine & (split_arr == "train"))),
                "val": int(np.sum(mine & (split_arr == "val"))),
                "share": float(mine.mean()) if len(y) else 0.0,
            }
        )
    return rows
