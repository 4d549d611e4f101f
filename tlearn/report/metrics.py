"""Metrics for a fitted model on labelled images: accuracy, balanced accuracy,
per-class precision/recall/F1/support and the confusion matrix."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file, check_output_parent, write_json
from tlearn.data.skipped import SKIPPED_CSV, write_skipped_csv


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """scikit-learn's definitions (precision_recall_fscore_support with zero_division=0,
    balanced_accuracy_score over the classes present), in numpy: importing
    sklearn.metrics costs more than a warm `evaluate` does (tested equal)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    if len(y_true) == 0:
        return {"accuracy": None, "balanced_accuracy": None, "n_images": 0, "per_class": {}}
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y_true, y_pred), 1)
    tp = np.diag(conf).astype(np.float64)
    s, predicted = conf.sum(axis=1), conf.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(predicted > 0, tp / predicted, 0.0)
        r = np.where(s > 0, tp / s, 0.0)
        f = np.where(s + predicted > 0, 2 * tp / (s + predicted), 0.0)
    accuracy = float(np.mean(y_true == y_pred))
    present = s > 0
    return {
        "accuracy": accuracy,
        # Only classes that occur in y_true count, so a class missing from the
        # evaluation folder does not drag the score down.
        "balanced_accuracy": float(np.mean(r[present])) if present.sum() > 1 else accuracy,
        "n_images": int(len(y_true)),
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion": {"labels": list(classes), "matrix": conf.tolist()},
    }


def write_reports(out_dir: str | Path, metrics: dict, skipped=()) -> list[Path]:
    """metrics.json, confusion.csv (rows = true class, columns = predicted), skipped.csv."""
    out_dir = Path(out_dir)
    check_output_parent(out_dir)
    out_dir.mkdir(exist_ok=True)
    written = [out_dir / "metrics.json"]
    write_json(written[0], metrics)
    conf = metrics.get("confusion")
    if conf:
        path = out_dir / "confusion.csv"
        with atomic_file(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["true\\predicted", *conf["labels"]])
            for label, row in zip(conf["labels"], conf["matrix"], strict=True):
                w.writerow([label, *row])
        written.append(path)

    written.append(write_skipped_csv(out_dir / SKIPPED_CSV, skipped))
    return written
