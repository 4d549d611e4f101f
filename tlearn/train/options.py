"""What `fit --head linear|mlp` was asked to do, checked before any work: TrainOptions
and their defaults, the Settings a checkpoint saves for --resume, the events callback
type and the result of a run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from tlearn.core.errors import UsageError
from tlearn.core.options import check_augment
from tlearn.core.spec import NN_HEADS
from tlearn.data.imageset import Skipped
from tlearn.heads.neural import head_config

Events = Callable[[str, dict], None]
BN_MODES = ("frozen", "train")
OPTIMIZERS = ("adamw", "sgd")
CACHE_MODES = ("memory", "disk", "off")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}


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
    choose_tta: bool = False  # after training: flip TTA if it raises validation accuracy

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Settings:
    """Everything that determines a run; saved in the checkpoint for --resume."""

    data: str | None
    val: str | None
    val_split: float | None
    labels_csv: str | None
    model: str
    weights: str
    layers: list[str] | None
    pool: str
    seed: int
    batch_size: int
    options: dict
    preset: dict | None = None  # the --preset recipe, recorded in config.json
    # --layer auto: {"summary": config.json's "layer_auto", "table": sweep.json}
    layer_auto: dict | None = None
    # --compare-svm: the SVM's validation score (jobs.compare_svm), set for a new run only
    compared: dict | None = None

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
    # frozen features: backend that ran (None: all cached), images cached and computed
    features: dict | None = None
    prefix_maps: dict | None = None  # frozen prefix maps: read from the cache, computed
    calibration: dict | None = None  # config.json's "calibration" (heads.posthoc)
    tta: dict | None = None  # config.json's "tta" (--choose-tta)
    time_limited: bool = False  # --time-limit stopped training before --epochs
    epochs_planned: int | None = None  # --epochs, when the time limit shortened the run
    layer_auto: dict | None = None  # config.json's "layer_auto": the cut --layer auto chose
    kept_phase: str | None = None  # which unfreezing phase the kept epoch trained in
    compared: dict | None = None  # --compare-svm: both validation scores, which was kept


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


def abs_path(p) -> str | None:
    """An absolute path as a string (what Settings record), None stays None."""
    return None if p is None else os.path.abspath(os.fspath(p))
