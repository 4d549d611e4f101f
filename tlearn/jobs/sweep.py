"""Where to cut: one forward pass per image collects pooled features at many cut points,
then a cross-validated linear head per layer (and per pair of the best layers).

Features grow more specific with depth, so the last layer is not always the best cut:
for textures (road surfaces) a mid-level block often wins, with fewer features that fit
faster. The sweep measures this on the user's own training images, by stratified k-fold
cross-validation only; a validation set is never looked at.

Extraction goes through `extract_layers` (one multi-layer FeatureNetwork, columns split
per layer), so a feature cache can wrap that one function.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.backbone.cut import layer_dims
from tlearn.backbone.layers import Candidate, candidate_layers
from tlearn.backbone.weights import Backbone, open_backbone
from tlearn.core.atomic import check_output_parent, write_json
from tlearn.core.deadline import Deadline
from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset
from tlearn.data.skipped import require_some_read
from tlearn.features.engine import CutRequest, open_engine
from tlearn.features.table import is_features_table
from tlearn.heads.linear import LinearHead, make_estimator, parse_C
from tlearn.heads.multilabel import MultiLabelLinear, label_matrix
from tlearn.report.plots import plot_sweep

PAIR_POOL = 4  # pairs are formed among this many best single layers
TIE_DECIMALS = 6  # CV accuracies equal to this many decimals are a tie


# ----------------------------------------------------------------------------- extraction


@dataclass
class LayerFeatures:
    """Pooled features of several layers side by side: X[:, offsets[i]:offsets[i+1]]
    belongs to layers[i]."""

    layers: tuple[str, ...]
    dims: tuple[int, ...]
    indices: np.ndarray  # positions of the images that could be read, in input order
    X: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)

    def columns(self, layers: Sequence[str]) -> np.ndarray:
        offsets = np.concatenate([[0], np.cumsum(self.dims)])
        cols = [
            np.arange(offsets[self.layers.index(n)], offsets[self.layers.index(n) + 1])
            for n in layers
        ]
        return np.concatenate(cols)

    def select(self, layers: Sequence[str]) -> np.ndarray:
        return np.ascontiguousarray(self.X[:, self.columns(layers)])


def extract_layers(
    backbone: Backbone,
    layers: Sequence[str],
    pool: str,
    paths: Sequence[str],
    run: RunOptions | None = None,
) -> LayerFeatures:
    """One forward pass per image, pooled features at every layer in `layers`.

    This is the one place the sweep touches the backbone. It runs through the same engine
    as extract (backend + on-disk feature cache keyed by the CutSpec of all `layers`), so
    a second sweep over the same images and candidates does not run the backbone again.
    """
    run = run or RunOptions()
    engine = open_engine(
        CutRequest(backbone.name, layers=list(layers), pool=pool), run, backbone=backbone
    )
    dims = layer_dims(engine.network, backbone.data_config["input_size"])
    feats = engine.extract(list(paths), run, stage="extract")
    X = feats.X if len(feats.indices) else np.zeros((0, sum(dims)), np.float32)
    return LayerFeatures(engine.spec.layers, dims, feats.indices, X, feats.skipped)


# ----------------------------------------------------------------------------- scoring


@dataclass
class SweepRow:
    """Cross-validated accuracy of a linear head on one cut (one layer or a pair)."""

    layers: tuple[str, ...]
    feature_dim: int
    shape: tuple[int, ...] | None  # map shape per image (None for a pair)
    params: int
    gflops: float  # cumulative to the deepest layer of the cut
    cv_mean: float
    cv_std: float
    C: float
    cv_seconds: float  # all cross-validation fits for this cut
    fit_seconds: float  # one fit on all sweep images at the chosen C
    stage: int | None = None
    converged: bool = True
    metric: str = "accuracy"  # what cv_mean measures: accuracy, or mAP for label sets

    @property
    def name(self) -> str:
        return ",".join(self.layers)

    def to_dict(self) -> dict:
        return {
            "layer": self.name,
            "layers": list(self.layers),
            "feature_dim": self.feature_dim,
            "shape": None if self.shape is None else list(self.shape),
            "params": self.params,
            "gflops": self.gflops,
            f"cv_{self.metric}": self.cv_mean,
            "cv_score": self.cv_mean,
            "cv_std": self.cv_std,
            "C": self.C,
            "cv_seconds": round(self.cv_seconds, 4),
            "fit_seconds": round(self.fit_seconds, 4),
            "stage": self.stage,
            "converged": self.converged,
        }


def cv_folds(y: np.ndarray, folds: int) -> int:
    """Folds for y: class ids, or a multi-label (n, L) matrix (each label stratified)."""
    if folds < 2:
        raise UsageError(f"--folds {folds}: use at least 2")
    if np.ndim(y) == 2:
        pos = np.asarray(y, dtype=bool).sum(axis=0)
        counts = np.r_[pos, len(y) - pos]
    else:
        counts = np.bincount(y)
    counts = counts[counts > 0]
    k = int(min(folds, counts.min()))
    if k < 2:
        raise DataError(
            f"a class has only {counts.min()} usable image(s); the sweep cross-validates and "
            "needs at least 2 per class (5 or more for trustworthy numbers)"
        )
    return k


def score_cut(
    X: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    *,
    head: str = "svm",
    C: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[float, float, float, float, float, bool]:
    """(mean, std, C, cv_seconds, fit_seconds, converged) of StandardScaler + linear head
    under stratified k-fold CV. C=None searches LinearHead's C grid and reports the best C
    (the same search `fit --C auto` runs); a number is used as is."""
    # scikit-learn costs ~1 s to import: the CV loop imports it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = cv_folds(y, folds)
    t0 = time.perf_counter()
    if np.ndim(y) == 2:  # multi-label: mean average precision of one-vs-rest heads
        return _score_multilabel(X, y, classes, head, C, folds, seed)
    if C is None:
        h = LinearHead(kind=head, C=None, folds=folds, seed=seed)
        h.fit(X, y, classes)
        total = time.perf_counter() - t0
        best = next(r for r in h.cv_results_ if r.C == h.C_)
        cv_seconds = sum(r.fit_seconds for r in h.cv_results_)
        return best.mean, best.std, h.C_, cv_seconds, total - cv_seconds, h.converged_
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    est = make_estimator(head, C, seed, LinearHead(kind=head).iterations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(est, X, y, cv=cv)
    cv_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    h = LinearHead(kind=head, C=C, folds=folds, seed=seed).fit(X, y, classes)
    return (
        float(scores.mean()),
        float(scores.std()),
        C,
        cv_seconds,
        time.perf_counter() - t1,
        h.converged_,
    )


def _score_multilabel(X, Y, labels, head, C, folds, seed):
    """score_cut's numbers for label sets: the CV mAP (std across labels)."""
    t0 = time.perf_counter()
    h = MultiLabelLinear(kind=head, C=C, folds=folds, seed=seed)
    if C is None:
        h.fit(X, Y, labels)
        best = next(r for r in h.cv_results_ if r.C == h.C_)
        cv_seconds = sum(r.fit_seconds for r in h.cv_results_)
        return best.mean, best.std, h.C_, cv_seconds, time.perf_counter() - t0 - cv_seconds, True
    h.fit(X, Y, labels)  # with a given C: one cross-validation for the out-of-fold mAP
    ap, cv_seconds = h.oof_ap_, h.oof_seconds_
    return (
        float(ap.mean()),
        float(ap.std()),
        C,
        cv_seconds,
        time.perf_counter() - t0 - cv_seconds,
        True,
    )


def _rank_key(row: SweepRow):
    # Best accuracy first; ties go to the cheaper cut (fewer GFLOPs, then fewer features).
    return (-round(row.cv_mean, TIE_DECIMALS), row.gflops, row.feature_dim)


@dataclass
class SweepResult:
    model: str
    weights_source: str
    pool: str
    head: str
    C: float | None  # None: searched per cut
    folds: int
    seed: int
    classes: list[str]
    n_images: int
    rows: list[SweepRow]  # single layers, in depth order
    pairs: list[SweepRow]
    best: SweepRow
    best_pair: SweepRow | None
    extract_seconds: float = 0.0
    seconds: float = 0.0
    data: str | None = None
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metric: str = "accuracy"  # "mAP" for label sets (the CV score in cv_accuracy's place)
    chosen: SweepRow | None = None  # fit --layer auto's pick (choose_cut); None: best
    choice: str = ""  # why `chosen` was picked
    stopped: list[str] = field(default_factory=list)  # what --time-limit left out

    @property
    def method(self) -> str:
        clf = "LinearSVC" if self.head == "svm" else "LogisticRegression"
        if self.metric == "mAP":
            clf = f"one-vs-rest {clf} per label"
        how = (
            f"C searched per cut over the grid ({self.metric} at the best C)"
            if self.C is None
            else f"C={self.C:g}"
        )
        return f"{self.folds}-fold stratified CV of StandardScaler + {clf}, {how}"

    def summary(self) -> dict:
        """What config.json records for `fit --layer auto`."""
        chosen = self.chosen or self.best
        out = {
            "chosen": list(chosen.layers),
            f"cv_{self.metric}": chosen.cv_mean,
            "cv_std": chosen.cv_std,
            "candidates": [r.name for r in self.rows],
            "best_pair": None if self.best_pair is None else list(self.best_pair.layers),
            "method": self.method,
            "table": "sweep.json",
        }
        if self.choice:
            out["choice"] = self.choice
        if self.stopped:
            out["time_limit"] = list(self.stopped)
        return out

    def json_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    def to_dict(self) -> dict:
        return {
            "format": "tlearn-sweep",
            "format_version": 1,
            "data": self.data,
            "model": self.model,
            "weights_source": self.weights_source,
            "pool": self.pool,
            "head": self.head,
            "C": "auto" if self.C is None else self.C,
            "folds": self.folds,
            "seed": self.seed,
            "method": self.method,
            "metric": self.metric,
            "classes": self.classes,
            "n_images": self.n_images,
            "recommended": self.best.to_dict(),
            "best_pair": None if self.best_pair is None else self.best_pair.to_dict(),
            "layers": [r.to_dict() for r in self.rows],
            "pairs": [r.to_dict() for r in self.pairs],
            "extract_seconds": round(self.extract_seconds, 3),
            "seconds": round(self.seconds, 3),
            "skipped": len(self.skipped),
        }


def sweep_features(
    feats: LayerFeatures,
    y: np.ndarray,
    classes: list[str],
    candidates: Sequence[Candidate],
    *,
    head: str = "svm",
    C: float | None = None,
    folds: int = 5,
    seed: int = 0,
    pairs: bool = True,
    progress=None,
    deadline: Deadline | None = None,
    stopped: list[str] | None = None,
    scored: dict | None = None,
) -> tuple[list[SweepRow], list[SweepRow], SweepRow, SweepRow | None]:
    """Score every candidate layer, then pairs among the PAIR_POOL best ones.
    Returns (rows in depth order, pairs, best single, best pair). With a `deadline` that
    passes, the sweep stops after the cut it is scoring (at least one is scored) and says
    what it left out in `stopped`. `scored`: score_cut results already computed, by
    layer tuple (fit --layer auto's time estimate scores one cut first)."""
    info = {c.name: c for c in candidates}
    depth = {c.name: i for i, c in enumerate(candidates)}
    n_pairs = len(list(itertools.combinations(range(min(PAIR_POOL, len(candidates))), 2)))
    total = len(candidates) + (n_pairs if pairs else 0)
    done = 0

    def score(layers: tuple[str, ...]) -> SweepRow:
        nonlocal done
        X = feats.select(layers)
        if scored is not None and layers in scored:
            mean, std, c, cv_s, fit_s, conv = scored[layers]
        else:
            mean, std, c, cv_s, fit_s, conv = score_cut(
                X, y, classes, head=head, C=C, folds=folds, seed=seed
            )
        deepest = info[max(layers, key=lambda n: depth[n])]
        done += 1
        if progress is not None:
            progress(done, total)
        return SweepRow(
            layers=layers,
            feature_dim=int(X.shape[1]),
            shape=deepest.shape if len(layers) == 1 else None,
            params=deepest.params,
            gflops=deepest.gflops,
            cv_mean=mean,
            cv_std=std,
            C=c,
            cv_seconds=cv_s,
            fit_seconds=fit_s,
            stage=deepest.stage if len(layers) == 1 else None,
            converged=conv,
            metric="mAP" if np.ndim(y) == 2 else "accuracy",
        )

    rows: list[SweepRow] = []
    for c in candidates:
        if rows and deadline is not None and deadline.passed():
            left = [x.name for x in candidates[len(rows) :]]
            _stop_note(stopped, f"layers not scored: {', '.join(left)}")
            pairs = False
            break
        rows.append(score((c.name,)))
    best = min(rows, key=_rank_key)
    pair_rows: list[SweepRow] = []
    if pairs and len(rows) >= 2 and deadline is not None and deadline.passed():
        _stop_note(stopped, "pairs of layers not scored")
    elif pairs and len(rows) >= 2:
        top = sorted(rows, key=_rank_key)[:PAIR_POOL]
        for a, b in itertools.combinations(top, 2):
            layers = tuple(sorted(a.layers + b.layers, key=lambda n: depth[n]))
            pair_rows.append(score(layers))
        pair_rows.sort(key=_rank_key)
    if progress is not None and done < total:  # stopped early: the stage is done either way
        progress(total, total)
    return rows, pair_rows, best, (pair_rows[0] if pair_rows else None)


def _stop_note(stopped: list[str] | None, text: str) -> None:
    if stopped is not None:
        stopped.append(f"time limit reached: {text}")


def choose_cut(best: SweepRow, best_pair: SweepRow | None, folds: int) -> tuple[SweepRow, str]:
    """fit --layer auto's cut: the best single layer, unless the best pair beats it by
    more than the noise of cross-validation, taken as one standard error of the single
    layer's CV mean (its std across the folds / sqrt(folds)). A pair doubles the work of
    extraction and the features; a gain smaller than that error is as likely a lucky
    split of the folds as a better cut."""
    if best_pair is None:
        return best, "the best single layer (no pair was scored)"
    margin = best.cv_std / math.sqrt(max(folds, 1))
    gain = best_pair.cv_mean - best.cv_mean
    if gain > margin:
        return best_pair, (
            f"the best pair: {gain:+.4f} over the best single layer, more than the CV noise "
            f"{margin:.4f} (its std / sqrt({folds} folds))"
        )
    return best, (
        f"the best single layer: the best pair gains {gain:+.4f}, not more than the CV "
        f"noise {margin:.4f} (std / sqrt({folds} folds))"
    )


# ----------------------------------------------------------------------------- the command


def _training_images(data, labels_csv, multi_label=False) -> tuple[ImageSet, list[str]]:
    notes: list[str] = []
    if labels_csv is not None:
        return read_labels_csv(labels_csv, multi_label=multi_label), notes
    if multi_label:
        raise UsageError("--multi-label reads label sets from --labels FILE (labels joined by ';')")
    if is_features_table(data):
        raise UsageError(
            f"{data} is a features table, which holds one cut: the sweep extracts every "
            "candidate layer, so it needs the images (a folder of class sub-folders or --labels)"
        )
    if not Path(data).is_dir():
        raise DataError(f"{data} is not a folder of class sub-folders (sweep needs images)")
    train, val = resolve_dataset(data)
    if val is not None:
        notes.append(
            f"sweeping on {Path(data) / 'train'} only: cross-validation, the val/ images "
            "are never used"
        )
    return train, notes


def sweep(
    data: str | Path | None,
    *,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers: str | Sequence[str] = "stages",
    pool: str = "avg",
    head: str = "svm",
    C: str | float = "auto",
    folds: int = 5,
    seed: int = 0,
    pairs: bool = True,
    labels_csv: str | Path | None = None,
    run: RunOptions | None = None,
    multi_label: bool = False,
) -> SweepResult:
    """Cross-validated accuracy of a linear head at each candidate cut of `model` on the
    labelled images in `data` (its train/ part when it has train/ and val/); with
    multi_label (label sets from labels_csv), the cross-validated mAP."""
    t0 = time.perf_counter()
    run = run or RunOptions()
    C_value = parse_C(C)
    LinearHead(kind=head)  # validates --head before any work
    images, notes = _training_images(data, labels_csv, multi_label)
    if len(images) == 0:
        raise DataError(f"no images found in {data}")
    backbone = open_backbone(model, weights, seed)
    candidates = candidate_layers(backbone.model, layers)
    feats = extract_layers(backbone, [c.name for c in candidates], pool, images.paths, run)
    extract_s = time.perf_counter() - t0
    require_some_read(len(feats.indices), list(images.skipped) + feats.skipped, labels_csv or data)
    y_all = np.asarray(images.labels, dtype=np.int64)
    y = y_all[feats.indices] if len(feats.indices) else np.zeros(0, np.int64)
    if multi_label:
        y, classes = label_matrix([images.classes[i] for i in y])
        if len(classes) < 2:
            raise DataError("the sweep needs usable images with at least two labels")
    else:
        present = sorted(set(y.tolist()))
        if len(present) < 2:
            raise DataError("the sweep needs usable images of at least two classes")
        # Classes without usable images are dropped so labels stay 0..K-1.
        classes = [images.classes[i] for i in present]
        y = np.searchsorted(np.asarray(present), y)
    rows, pair_rows, best, best_pair = sweep_features(
        feats,
        y,
        classes,
        candidates,
        head=head,
        C=C_value,
        folds=folds,
        seed=seed,
        pairs=pairs,
        progress=run.bar("cross-validate"),
    )
    return SweepResult(
        model=backbone.name,
        weights_source=backbone.weights.source,
        pool=pool,
        head=head,
        C=C_value,
        folds=cv_folds(y, folds),
        seed=seed,
        classes=classes,
        n_images=int(len(y)),
        rows=rows,
        pairs=pair_rows,
        best=best,
        best_pair=best_pair,
        extract_seconds=extract_s,
        seconds=time.perf_counter() - t0,
        data=None if data is None else str(data),
        skipped=list(images.skipped) + feats.skipped,
        warnings=list(images.warnings) + notes,
        metric="mAP" if multi_label else "accuracy",
    )


def write_sweep(result: SweepResult, out_dir: str | Path) -> list[Path]:
    """sweep.json and sweep.png (accuracy vs depth, cost on a second axis) in out_dir."""

    out_dir = Path(out_dir)
    check_output_parent(out_dir)
    out_dir.mkdir(exist_ok=True)
    paths = [out_dir / "sweep.json", out_dir / "sweep.png"]
    write_json(paths[0], result.to_dict())
    plot_sweep(result.to_dict(), paths[1])
    return paths
