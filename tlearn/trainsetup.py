"""Fine-tuning options and datasets: what `fit --head linear|mlp` was asked to do, checked
before any work, and the training/validation image sets it runs on (tlearn.train)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.core.errors import DataError, UsageError
from tlearn.core.spec import NN_HEADS
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.data.labels import read_labels_csv
from tlearn.data.scan import resolve_dataset, scan_class_folders
from tlearn.data.split import stratified_split
from tlearn.heads.neural import head_config
from tlearn.runtime.augment import check_augment

Events = Callable[[str, dict], None]
BN_MODES = ("frozen", "train")
OPTIMIZERS = ("adamw", "sgd")
CACHE_MODES = ("memory", "disk", "off")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
HISTORY_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "seconds",
    "images_per_s",
)


@dataclass
class TrainOptions:
    """Settings that change what is learned. None = the documented default."""

    head: str = "linear"
    hidden: str | None = None
    dropout: float | None = None
    head_bn: bool = False
    freeze: str | None = None
    freeze_to: str | None = None
    freeze_epochs: int = 0
    bn: str = "frozen"
    lr: float | None = None
    layer_decay: float | None = None
    lr_groups: str | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weight: str | None = None
    epochs: int = 10
    patience: int | None = None
    augment: str | None = None
    cache: str = "memory"
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class NNFitResult:
    out_dir: str
    classes: list[str]
    n_train: int
    n_val: int
    groups: list[dict]
    mode: str
    history: list[dict]
    best_epoch: int | None
    val_metrics: dict | None
    stopped_early: bool
    skipped: list[Skipped]
    warnings: list[str]
    seconds: float
    settings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks


def check_options(o: TrainOptions) -> None:
    if o.head not in NN_HEADS:
        raise UsageError(f"unknown neural head '{o.head}'; allowed: {', '.join(NN_HEADS)}")
    head_config(o.head, hidden=o.hidden, dropout=o.dropout, batchnorm=o.head_bn)
    if o.augment is not None:
        check_augment(o.augment)
    if o.epochs < 1:
        raise UsageError(f"--epochs {o.epochs}: must be at least 1")
    if not 0 <= o.freeze_epochs < o.epochs:
        raise UsageError(
            f"--freeze-epochs {o.freeze_epochs}: must be at least 0 and below --epochs "
            f"({o.epochs}); the head trains alone for that many epochs, then the rest"
        )
    if o.bn not in BN_MODES:
        raise UsageError(f"unknown --bn '{o.bn}'; allowed: {', '.join(BN_MODES)}")
    if o.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer '{o.optimizer}'; allowed: {', '.join(OPTIMIZERS)}")
    if o.lr is not None and not o.lr > 0:
        raise UsageError(f"--lr {o.lr}: must be positive, e.g. 1e-3")
    if not o.weight_decay >= 0:
        raise UsageError(f"--weight-decay {o.weight_decay}: must be 0 or positive")
    if not 0 <= o.momentum < 1:
        raise UsageError(f"--momentum {o.momentum}: must be in [0, 1), e.g. 0.9")
    if not o.warmup_epochs >= 0:
        raise UsageError(f"--warmup-epochs {o.warmup_epochs}: must be 0 or positive")
    if not 0 <= o.label_smoothing < 1:
        raise UsageError(f"--label-smoothing {o.label_smoothing}: must be in [0, 1), e.g. 0.1")
    if o.class_weight not in (None, "balanced"):
        raise UsageError(f"--class-weight '{o.class_weight}': the only choice is balanced")
    if o.patience is not None and o.patience < 1:
        raise UsageError(f"--patience {o.patience}: must be at least 1 epoch")
    if o.cache not in CACHE_MODES:
        raise UsageError(f"unknown --cache '{o.cache}'; allowed: {', '.join(CACHE_MODES)}")
    if o.freeze_epochs and o.freeze == "all":
        raise UsageError(
            "--freeze-epochs with --freeze all: the head trains alone anyway; drop one"
        )


def default_augment(backbone_trains: bool) -> str:
    """light (random-resized crop + flip) when the backbone trains: fine-tuning on a small
    folder overfits without it. flip for a frozen backbone: exact and cheap there, since
    the features of each image and of its mirror image are computed once."""
    return "light" if backbone_trains else "flip"


# ----------------------------------------------------------------------------- data


def _fingerprint(train: ImageSet, val: ImageSet | None) -> str:
    h = hashlib.sha256()
    for s in (train, val):
        if s is not None:
            h.update(json.dumps([s.paths, s.labels, s.classes]).encode())
    return h.hexdigest()


def _split_images(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    tr, va = stratified_split(images.labels, fraction, seed)
    return images.subset(tr.tolist()), images.subset(va.tolist())


def load_datasets(
    data, *, val=None, val_split=None, labels_csv=None, seed: int = 0
) -> tuple[ImageSet, ImageSet | None]:
    """Training images and (optional) validation images, labels on the train classes."""
    if val is not None and val_split is not None:
        raise UsageError("use either --val DIR or --val-split, not both")
    from tlearn.features.table import is_features_csv

    if data is not None and is_features_csv(data):
        raise UsageError(
            f"{data} is a features CSV: neural heads train from images (their backbone may "
            "train); use --head svm|logreg for features CSVs"
        )
    found_val = None
    if labels_csv is not None:
        train = read_labels_csv(labels_csv)
    else:
        if data is None or not Path(data).is_dir():
            raise DataError(f"{data} is not a folder of class sub-folders")
        train, found_val = resolve_dataset(data)
    if len(train) == 0:
        raise DataError(f"no images found in {data}")
    if len(train.classes) < 2:
        raise DataError(
            f"fit needs at least two classes with images; found {len(train.classes)} "
            f"({', '.join(train.classes) or 'none'})"
        )
    valid = None
    if val is not None:
        if not Path(val).is_dir():
            raise DataError(f"--val {val}: not a folder of class sub-folders")
        valid = scan_class_folders(val, classes=train.classes)
    elif val_split is not None:
        if found_val is not None:
            train = train.concat(found_val)
        train, valid = _split_images(train, val_split, seed)
    else:
        valid = found_val
    return train, valid
