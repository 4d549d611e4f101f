"""The jobs behind each command: image folder -> features -> head -> model directory,
and model directory -> predictions / metrics. cli.py calls exactly one of these per
command and renders what it returns; nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL, FLATTEN_WARN_DIM, CutSpec, is_auto_layer
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import load_images, resolve_dataset, scan_class_folders
from tlearn.data.scan import scan_inputs as scan_unlabeled
from tlearn.data.skipped import SKIPPED_CSV, skipped_csv_bytes, strict_failure, write_skipped_csv
from tlearn.data.split import stratified_split
from tlearn.features.engine import CutRequest, SavedCut, open_engine
from tlearn.features.stream import FeatureBatch
from tlearn.features.table import (
    feature_meta,
    is_features_csv,
    partial_rows,
    read_features_csv,
    write_features_csv,
)
from tlearn.heads.linear import LinearHead, parse_C
from tlearn.modeldir import SavedModel, build_config, load_model, save_model
from tlearn.report.metrics import classification_metrics
from tlearn.scale.shard import Shard, finish_features_part, plan_part, score_by_batch

# ----------------------------------------------------------------------------- extract


@dataclass
class ExtractResult:
    rows: int
    feature_dim: int
    out: str
    skipped: list[Skipped]
    warnings: list[str]
    seconds: float
    engine: dict = field(default_factory=dict)  # backend, device, cached, computed


def extract(
    data: Sequence[str | Path],
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers: str | Sequence[str] | None = None,
    pool: str = "avg",
    labels_csv: str | Path | None = None,
    strict: bool = False,
    resume: bool = False,
    run: RunOptions | None = None,
    shard: Shard | None = None,
) -> ExtractResult:
    """Features of every readable image to CSV. Unreadable images are listed in
    skipped.csv beside the output; with `strict` any of them fails the run and nothing
    is written. With `resume`, rows of an interrupted run's partial file are kept.
    With `shard`, only that shard's images go to the part file OUT.part-I-of-N, whose
    sidecar lists its unreadable images (see tlearn.shard; `merge` joins the parts)."""
    run = run or RunOptions()
    t0 = time.perf_counter()
    images = load_images(data, labels_csv)
    if len(images) == 0:
        raise DataError(f"no images found in {', '.join(map(str, data))}")
    to_stdout = str(out) == "-"
    if resume and to_stdout:
        raise UsageError("--resume needs an output file, not -o -")
    if shard is not None and to_stdout:
        raise UsageError("--shard needs an output file, not -o -: each shard writes a part")
    engine = open_engine(CutRequest(model, weights, layers, pool), run)
    spec, data_config = engine.spec, engine.data_config
    dim = engine.feature_dim()
    warnings = list(images.warnings)
    if pool == "flatten" and dim > FLATTEN_WARN_DIM:
        warnings.append(
            f"--pool flatten gives {dim} features per image; the CSV will be large "
            "(avg or catavgmax pooling keep it small)"
        )
    meta = feature_meta(spec, data_config, dim)
    labels = images.label_names if images.labels is not None else None
    part, lo, hi = None, 0, len(images)
    if shard is not None:
        part = plan_part(shard, images.paths, labels, images.skipped, run.batch_size)
        out, lo, hi, meta = part.path(out), part.start, part.stop, {**meta, "shard": part.info()}
    done = set(partial_rows(out, meta)) if resume and not to_stdout else set()
    if part is not None:
        part.check_resume(done, images.paths)
    todo = [i for i in range(lo, hi) if images.paths[i] not in done]
    skipped = list(images.skipped)
    batches = engine.stream([images.paths[i] for i in todo], run, stage="extract", skipped=skipped)
    # iter_features numbers images within `todo`; map back to positions in `images`.
    batches = (FeatureBatch([todo[i] for i in b.indices], b.features) for b in batches)

    def check_strict():
        if strict and skipped:
            raise strict_failure(skipped)

    rows = write_features_csv(
        batches, images.paths, labels, out, meta, resume=bool(done), before_commit=check_strict
    )
    if to_stdout:
        check_strict()
    elif part is not None:
        finish_features_part(out, skipped[len(images.skipped) :])
    else:
        write_skipped_csv(Path(out).parent / SKIPPED_CSV, skipped)
    return ExtractResult(
        rows=rows,
        feature_dim=dim,
        out=str(out),
        skipped=skipped,
        warnings=warnings + engine.notes,
        seconds=time.perf_counter() - t0,
        engine=engine.summary(),
    )


# ----------------------------------------------------------------------------- fit


@dataclass
class LabelledFeatures:
    paths: list[str]
    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


class _FeatureSource:
    """Features for images or for a features CSV, with the backbone opened at most once."""

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

    def from_csv(self, path) -> LabelledFeatures:
        table = read_features_csv(path)
        spec = CutSpec.from_dict(table.meta["cut"])
        if self.spec is not None and self.spec != spec:
            raise DataError(f"{path} was extracted with another backbone/layer/pool than the rest")
        self.spec, self.data_config = spec, table.meta["data_config"]
        unlabeled = [i for i, lab in enumerate(table.labels) if lab is None]
        if unlabeled:
            raise DataError(
                f"{path}: row {unlabeled[0] + 2} has no label; fit needs a label on every row"
            )
        classes = sorted(set(table.labels))
        return LabelledFeatures(
            paths=table.paths,
            X=table.X,
            y=np.asarray([classes.index(lab) for lab in table.labels], dtype=np.int64),
            classes=classes,
        )


def _drop_empty_classes(train: LabelledFeatures) -> LabelledFeatures:
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


def _split(train: LabelledFeatures, fraction: float, seed: int):
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
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; choose another -o or pass --force")
    auto = is_auto_layer(layers)
    if auto:
        from tlearn.sweep import AutoLayerSource

        # one pass extracts every candidate layer; `choose` keeps the best (CV on train)
        source = AutoLayerSource(model, weights, pool, run, seed, head=head, C=C_value)
    else:
        source = _FeatureSource(model, weights, layers, pool, run, seed)

    val_images: ImageSet | None = None
    if is_features_csv(data):
        train = source.from_csv(data)
    else:
        if labels_csv is not None:
            train_images = read_labels_csv(labels_csv)
        else:
            if not Path(data).is_dir():
                raise DataError(
                    f"{data} is not a folder of class sub-folders or a features CSV from "
                    "tlearn extract"
                )
            train_images, val_images = resolve_dataset(data)
        if len(train_images) == 0:
            raise DataError(f"no images found in {data}")
        train = source.from_images(train_images, train_images.classes, "extract train")
    train = _drop_empty_classes(train)
    if len(train.classes) < 2:
        raise DataError(
            f"fit needs at least two classes with usable images; found "
            f"{len(train.classes)} ({', '.join(train.classes) or 'none'})"
        )

    valid: LabelledFeatures | None = None
    if val is not None:
        valid = _val_features(source, val, train.classes)
    elif val_split is not None:
        train, valid = _split(train, val_split, seed)
    elif val_images is not None:
        valid = _val_from_images(source, val_images, train.classes)

    skipped = train.skipped + (valid.skipped if valid else [])
    if strict and skipped:
        raise strict_failure(skipped)
    sweep_result = None
    if auto:
        train, valid, sweep_result = source.choose(train, valid)
    estimator.fit(train.X, train.y, train.classes)
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


def _val_from_images(source, images: ImageSet, classes: list[str]) -> LabelledFeatures:
    unknown = [c for c in images.classes if c not in classes]
    if unknown:
        raise DataError(
            f"validation class(es) {', '.join(unknown)} are not among the training classes "
            f"({', '.join(classes)})"
        )
    return source.from_images(images, classes, "extract val")


def _val_features(source, val, classes: list[str]) -> LabelledFeatures:
    if is_features_csv(val):
        table = source.from_csv(val)
        unknown = [c for c in table.classes if c not in classes]
        if unknown:
            raise DataError(f"{val}: class(es) {', '.join(unknown)} not in training classes")
        table.y = np.asarray([classes.index(table.classes[v]) for v in table.y], np.int64)
        table.classes = classes
        return table
    if not Path(val).is_dir():
        raise DataError(f"--val {val}: not a folder of class sub-folders or a features CSV")
    return _val_from_images(source, scan_class_folders(val), classes)


# ----------------------------------------------------------------------------- predict


@dataclass
class Prediction:
    path: str
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class PredictResult:
    predictions: list[Prediction]
    classes: list[str]
    score_kind: str  # "probability" or "svm margin"
    skipped: list[Skipped]
    warnings: list[str]
    part: dict | None = None  # with a shard: what tlearn.shard writes in the part's sidecar


def _saved_features(saved: SavedModel, images: ImageSet, run: RunOptions, stage: str):
    engine = open_engine(SavedCut(saved.cut, saved.data_config), run)
    return engine.extract(images.paths, run, stage=stage)  # preprocessing exactly as in fit


def _head(saved: SavedModel) -> LinearHead:
    return LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)


def predict(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    *,
    strict: bool = False,
    tta: str = "none",
    run: RunOptions | None = None,
    shard: Shard | None = None,
) -> PredictResult:
    run = run or RunOptions()
    saved = load_model(model_dir)
    nn_model = saved.is_nn
    head = None if nn_model else _head(saved)
    score_kind = "probability" if nn_model or head.kind == "logreg" else "svm margin"
    part, n_scan_skipped = None, 0
    if len(inputs) == 1 and is_features_csv(inputs[0]):
        table = read_features_csv(inputs[0])
        if CutSpec.from_dict(table.meta["cut"]) != saved.cut:
            raise DataError(f"{inputs[0]} was extracted with another cut than the model's")
        _no_tta_on_features(tta)
        paths, X, skipped, warnings = table.paths, table.X, [], []
        if shard is not None:
            part = plan_part(shard, paths, None, [], run.batch_size)
            paths, X = paths[part.start : part.stop], X[part.start : part.stop]
        batch_of = np.arange(len(paths)) // max(1, run.batch_size)
        scores = score_by_batch(
            lambda x: _feature_scores(saved, head, x), X, batch_of, len(saved.classes)
        )
    else:
        images = scan_unlabeled(list(inputs))
        if len(images) == 0 and not images.skipped:
            raise DataError(f"no images found in {', '.join(map(str, inputs))}")
        n_scan_skipped = len(images.skipped)
        if shard is not None:
            part = plan_part(shard, images.paths, None, images.skipped, run.batch_size)
            images = images.subset(range(part.start, part.stop))
        if nn_model or tta != "none":
            scored = _scored(saved, images.paths, tta, run, "predict")
            paths = [images.paths[i] for i in scored.indices]
            scores, skipped = scored.scores, images.skipped + scored.skipped
            warnings = images.warnings
        else:
            feats = _saved_features(saved, images, run, "predict")
            paths = [images.paths[i] for i in feats.indices]
            X, skipped = feats.X, images.skipped + feats.skipped
            warnings = list(images.warnings) + feats.notes
            batch_of = np.asarray(feats.indices) // max(1, run.batch_size)
            scores = score_by_batch(head.scores, X, batch_of, len(saved.classes))
    if strict and skipped:
        raise strict_failure(skipped)
    preds = [
        Prediction(
            path=p,
            label=saved.classes[int(s.argmax())],
            score=float(s.max()),
            scores={c: float(v) for c, v in zip(saved.classes, s, strict=True)},
        )
        for p, s in zip(paths, scores, strict=True)
    ]
    return PredictResult(
        predictions=preds,
        classes=saved.classes,
        score_kind=score_kind,
        skipped=skipped,
        warnings=list(warnings),
        part=None if part is None else part.info(skipped[n_scan_skipped:]),
    )


def _no_tta_on_features(tta: str) -> None:
    if tta != "none":
        raise UsageError(f"--tta {tta} needs images, not a features CSV; use --tta none")


def _feature_scores(saved: SavedModel, head: LinearHead | None, X: np.ndarray) -> np.ndarray:
    if len(X) == 0:
        return np.zeros((0, len(saved.classes)))
    if head is not None:
        return head.scores(X)
    from tlearn import infer

    return infer.nn_scores_from_features(saved, X)


def _scored(saved: SavedModel, paths, tta: str, run: RunOptions, stage: str):
    from tlearn import infer

    return infer.score_images(
        saved,
        paths,
        tta=tta,
        batch_size=run.batch_size,
        device=run.device,
        workers=run.workers,
        progress=run.bar(stage),
    )


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
    nn_model = saved.is_nn
    head = None if nn_model else _head(saved)
    score_kind = "probability" if nn_model or head.kind == "logreg" else "svm margin"
    classes = saved.classes
    if is_features_csv(data):
        table = read_features_csv(data)
        missing = [i for i, lab in enumerate(table.labels) if lab is None]
        if missing:
            raise DataError(f"{data}: row {missing[0] + 2} has no label; evaluate needs labels")
        unknown = sorted({lab for lab in table.labels if lab not in classes})
        if unknown:
            raise DataError(f"{data}: class(es) {', '.join(unknown)} are not in the model")
        _no_tta_on_features(tta)
        y = np.asarray([classes.index(lab) for lab in table.labels], dtype=np.int64)
        scores = _feature_scores(saved, head, table.X)
        skipped, warnings = [], []
        paths = list(table.paths)
    else:
        if labels_csv is not None:
            images = read_labels_csv(labels_csv, classes=classes)
        else:
            if not Path(data).is_dir():
                raise DataError(f"{data}: not a folder of class sub-folders or a features CSV")
            images = scan_class_folders(data, classes=classes)
        if len(images) == 0:
            raise DataError(f"no images found in {data}")
        remap = np.asarray([classes.index(c) for c in images.classes], dtype=np.int64)
        if nn_model or tta != "none":
            scored = _scored(saved, images.paths, tta, run, "evaluate")
            indices, scores = scored.indices, scored.scores
            skipped, notes = images.skipped + scored.skipped, []
        else:
            feats = _saved_features(saved, images, run, "evaluate")
            indices = feats.indices
            scores = head.scores(feats.X) if len(indices) else np.zeros((0, len(classes)))
            skipped = images.skipped + feats.skipped
            notes = feats.notes
        y = remap[np.asarray(images.labels, dtype=np.int64)[indices]]
        warnings = list(images.warnings) + notes
        paths = [images.paths[i] for i in indices]
    if strict and skipped:
        raise strict_failure(skipped)
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
        score_kind=score_kind,
    )
