"""Setting a run up: the image sets, the cut network with its new head, the
parameter-group plan and freezing, what training may change (`mutable`), how an epoch
runs (`mode`: features / prefix / images, see the package docstring), the optimiser,
mixed precision and the schedule. The result, a `Setup`, is what every later stage
reads; it also knows the training forward and the loss of its mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tlearn.cache.remembered import remember_layers
from tlearn.cache.store import cache_root
from tlearn.core.errors import UsageError
from tlearn.core.options import CACHEABLE_AUGMENTS, RunOptions
from tlearn.core.spec import CutSpec
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.features.engine import CutRequest, Engine, open_engine
from tlearn.heads.neural import head_config
from tlearn.heads.neural_torch import NNHead
from tlearn.runtime.device import resolve_device
from tlearn.train.datasets import data_fingerprint, load_datasets
from tlearn.train.dist import Dist
from tlearn.train.optim import Amp, amp_for, apply_freeze, build_optimizer, frozen_modules
from tlearn.train.options import (
    DEFAULT_LR,
    Settings,
    TrainOptions,
    check_options,
    default_augment,
)
from tlearn.train.plan import HEAD, GroupPlan, GroupRow
from tlearn.train.schedule import Schedule

if TYPE_CHECKING:  # timm costs seconds to import: only the full network path needs it
    from tlearn.backbone.transfer import TransferNet
    from tlearn.backbone.weights import Backbone


@dataclass
class Network:
    """The cut network with its new head, and what describes it in the model directory."""

    net: TransferNet
    spec: CutSpec
    data_config: dict
    feature_dim: int
    head_cfg: dict
    backbone: Backbone | None  # for the feature engine; None: the engine needs none


@dataclass
class Setup:
    """A run ready to train (the same on every torchrun rank)."""

    settings: Settings
    options: TrainOptions
    run: RunOptions
    out_dir: Path
    dist: Dist | None  # under torchrun, else None
    train_set: ImageSet
    val_set: ImageSet | None
    classes: list[str]
    fingerprint: str
    device: torch.device
    batch_size: int  # the global batch
    network: Network
    lr: float  # the head's rate (--lr or the optimiser's default)
    plan: GroupPlan
    augment: str
    mutable: set[str]  # state_dict keys training can change (saved in checkpoints)
    split: int  # chain modules in the frozen prefix
    mode: str  # features | prefix | images
    optimizer: torch.optim.Optimizer
    amp: Amp
    schedule: Schedule
    y_train: torch.Tensor  # labels by image index
    y_val: torch.Tensor | None
    warnings: list[str]
    skipped: list[Skipped]  # grows as caches and epochs find unreadable images
    engine: Engine | None = None  # of frozen features: opened by build or when needed
    prefix_maps: dict = field(default_factory=dict)  # frozen prefix maps: cached, computed

    @property
    def net(self) -> TransferNet:
        return self.network.net

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """One training forward of the run's mode: `x` is a batch of features, of cached
        prefix maps or of images."""
        net = self.net
        if self.mode == "features":
            return net.head(x.float())
        if self.mode == "prefix":
            return net.forward_from_prefix(x.float())
        if self.split > 0:
            with torch.no_grad():
                h = net.forward_prefix(x)
            return net.forward_from_prefix(h)
        return net(x)

    def criterion(self, reduction: str = "mean") -> nn.Module:
        weight = None
        if self.options.class_weight == "balanced":
            n_classes = len(self.classes)
            counts = np.bincount(np.asarray(self.train_set.labels), minlength=n_classes)
            w = len(self.train_set.labels) / (n_classes * np.maximum(counts, 1))
            weight = torch.as_tensor(w, dtype=torch.float32, device=self.device)
        return nn.CrossEntropyLoss(
            weight=weight, label_smoothing=self.options.label_smoothing, reduction=reduction
        )

    def describe(self) -> dict:
        """The "groups" event: the parameter-group table and how epochs run."""
        return {
            "rows": [r.to_dict() for r in self.plan.rows],
            "mode": self.mode,
            "augment": self.augment,
            "split": (
                [f"model.{self.plan.freeze_to}"]
                if self.plan.freeze_to and self.mode != "images"
                else self.net.prefix_module_names()[-1:]
            )
            if self.split
            else [],
            "optimizer": self.options.optimizer,
            "epochs": self.options.epochs,
            "device": str(self.device),
        }


def _check_batch_size(run: RunOptions, batch_size: int, dist: Dist | None) -> None:
    if run.batch_size < 1:
        raise UsageError(f"--batch-size {run.batch_size}: must be at least 1")
    if dist is not None and batch_size % dist.world:
        w = dist.world
        raise UsageError(
            f"--batch-size {batch_size} is the global batch, split evenly over the "
            f"{w} processes: it must be a multiple of {w} (e.g. "
            f"{max(w, batch_size // w * w)} or {(batch_size // w + 1) * w})"
        )


def _network(s: Settings, o: TrainOptions, n_classes: int) -> Network:
    # the backbone itself (torch + timm): a frozen backbone's head never needs it
    from tlearn.backbone.cut import cut_spec, feature_dim
    from tlearn.backbone.layers import layer_names, resolve_layers
    from tlearn.backbone.transfer import TransferNet
    from tlearn.backbone.weights import open_backbone

    backbone = open_backbone(s.model, s.weights, s.seed)
    remember_layers(cache_root(), layer_names(backbone.model, s.model))  # for fail-fast checks
    layers = resolve_layers(backbone.model, s.layers)
    spec = cut_spec(backbone, layers, s.pool)
    data_config = backbone.data_config
    size = int(data_config["input_size"][1])
    net = TransferNet(backbone.model, layers, s.pool, None, size)
    dim = feature_dim(net, net.input_shape)
    head_cfg = head_config(o.head, hidden=o.hidden, dropout=o.dropout, batchnorm=o.head_bn)
    # The head's initial weights depend on the seed alone (not on what ran before).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net.head = NNHead(head_cfg, dim, n_classes)
    return Network(net, spec, data_config, dim, head_cfg, backbone)


class HeadOnly(nn.Module):
    """What trains when the whole backbone is frozen: the head alone, named head.* as in
    TransferNet. Its pooled features come from the feature engine (warm, cached), so the
    backbone is not even loaded when the engine has them."""

    def __init__(self, head: nn.Module, layers):
        super().__init__()
        self.model = nn.Module()  # no backbone here: nothing of it runs or trains
        self.head = head
        self.layers = tuple(layers)
        self.chain = None
        self.split = 0

    def prefix_module_names(self) -> list[str]:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def frozen_features_only(o: TrainOptions) -> bool:
    """The options freeze the whole backbone and train on cached pooled features (the
    default --head linear|mlp): then only the head is built."""
    augment = o.augment or default_augment(False)
    return (
        o.freeze in (None, "all")
        and o.freeze_to is None
        and o.layer_decay is None
        and o.lr_groups is None
        and o.bn == "frozen"
        and o.cache != "off"
        and augment in CACHEABLE_AUGMENTS
    )


def _head_only(
    s: Settings, o: TrainOptions, n_classes: int, run: RunOptions, lr: float
) -> tuple[Network, GroupPlan, Engine]:
    """The head on features from the engine (warm when the cache has the cut), and the
    plan: the frozen backbone, then the head."""
    engine = open_engine(CutRequest(s.model, s.weights, s.layers, s.pool, s.seed), run)
    dim = engine.feature_dim()
    head_cfg = head_config(o.head, hidden=o.hidden, dropout=o.dropout, batchnorm=o.head_bn)
    with torch.random.fork_rng(devices=[]):  # the seed alone sets the initial weights
        torch.manual_seed(s.seed)
        head = NNHead(head_cfg, dim, n_classes)
    net = HeadOnly(head, engine.spec.layers)
    params = [n for n, _ in net.named_parameters()]
    count = sum(p.numel() for p in net.parameters())
    cut = ",".join(engine.spec.layers)
    rows = [
        GroupRow("backbone", [f"backbone up to {cut}"], [], None, None, True),
        GroupRow(HEAD, [HEAD], params, count, lr, False),
    ]
    network = Network(net, engine.spec, engine.data_config, dim, head_cfg, None)
    return network, GroupPlan(rows=rows), engine


def mutable_names(net: TransferNet, plan: GroupPlan, bn: str) -> set[str]:
    """state_dict keys training can change: trainable parameters, the head, and the
    buffers (BatchNorm statistics) of used modules that run in train mode."""
    from tlearn.backbone.transfer import execution_order  # the full network path (timm)

    frozen_ids = {id(m) for m in frozen_modules(net)} if bn == "frozen" else set()
    frozen = [n for n, m in net.named_modules() if id(m) in frozen_ids]
    used = set(execution_order(net))
    out = set(plan.trainable_params)
    for name, m in net.named_modules():
        in_frozen = any(name == f or name.startswith(f + ".") for f in frozen)
        is_head = name == "head" or name.startswith("head.")
        if is_head or (name in used and not in_frozen):
            prefix = f"{name}." if name else ""
            out.update(prefix + b for b, _ in m.named_buffers(recurse=False))
    return out


def _frozen_split(net: TransferNet, plan: GroupPlan, bn: str) -> int:
    """The largest chain prefix whose parameters are all frozen for the whole run."""
    split = 0
    if net.chain is not None and bn == "frozen":
        trainable = plan.trainable_params
        for i, (name, m) in enumerate(net.chain):
            if any(f"model.{name}.{p}" in trainable for p, _ in m.named_parameters()):
                break
            split = i + 1
    return split


def _mode(o: TrainOptions, plan: GroupPlan, split: int, augment: str) -> str:
    cacheable = o.cache != "off" and o.bn == "frozen"
    if not plan.backbone_trains and cacheable and augment in CACHEABLE_AUGMENTS:
        return "features"
    if cacheable and 0 < split and augment in CACHEABLE_AUGMENTS:
        return "prefix"
    return "images"


def build(settings: Settings, out_dir: Path, run: RunOptions, dist: Dist | None) -> Setup:
    """Everything a run needs before its first epoch; raises on a bad option or data."""
    s = settings
    o = TrainOptions(**s.options)
    check_options(o)
    train_set, val_set = load_datasets(
        s.data, val=s.val, val_split=s.val_split, labels_csv=s.labels_csv, seed=s.seed
    )
    warnings = train_set.warnings + (val_set.warnings if val_set else [])
    skipped = train_set.skipped + (val_set.skipped if val_set else [])
    classes = list(train_set.classes)
    fingerprint = data_fingerprint(train_set, val_set)
    device = resolve_device(run.device)
    _check_batch_size(run, s.batch_size, dist)
    lr = o.lr if o.lr is not None else DEFAULT_LR[o.optimizer]
    engine = None
    if frozen_features_only(o):
        network, plan, engine = _head_only(s, o, len(classes), run, lr)
    else:
        from tlearn.train.groups import plan_groups  # the full network path (timm)

        network = _network(s, o, len(classes))
        plan = plan_groups(
            network.net,
            lr=lr,
            freeze=o.freeze,
            freeze_to=o.freeze_to,
            layer_decay=o.layer_decay,
            lr_groups=o.lr_groups,
        )
    net = network.net
    warnings += plan.notes
    if o.freeze_epochs and not plan.backbone_trains:
        raise UsageError(
            "--freeze-epochs: nothing in the backbone trains after the head-only epochs; "
            "add --freeze-to LAYER, --freeze none or --layer-decay"
        )
    augment = o.augment or default_augment(plan.backbone_trains)
    apply_freeze(net, plan)
    # the head alone: all of it (parameters and batch-norm statistics) trains
    mutable = set(net.state_dict()) if engine is not None else mutable_names(net, plan, o.bn)
    split = _frozen_split(net, plan, o.bn)
    net.split = split
    mode = _mode(o, plan, split, augment)
    net.to(device)
    optimizer = build_optimizer(
        net, plan, optimizer=o.optimizer, weight_decay=o.weight_decay, momentum=o.momentum
    )
    amp = amp_for(device)
    schedule = Schedule.plan(
        len(train_set),
        s.batch_size,
        epochs=o.epochs,
        freeze_epochs=o.freeze_epochs,
        warmup=o.warmup_epochs,
    )
    return Setup(
        settings=s,
        options=o,
        run=run,
        out_dir=out_dir,
        dist=dist,
        train_set=train_set,
        val_set=val_set,
        classes=classes,
        fingerprint=fingerprint,
        device=device,
        batch_size=s.batch_size,
        network=network,
        lr=lr,
        plan=plan,
        augment=augment,
        mutable=mutable,
        split=split,
        mode=mode,
        optimizer=optimizer,
        amp=amp,
        schedule=schedule,
        y_train=torch.as_tensor(train_set.labels, dtype=torch.long),
        y_val=None if val_set is None else torch.as_tensor(val_set.labels, dtype=torch.long),
        warnings=warnings,
        skipped=skipped,
        engine=engine,
    )
