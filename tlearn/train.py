"""Fine-tuning: a new neural head on the cut network, freezing, learning rates per layer
group, augmentation, validation every epoch, early stopping, checkpoints and resume.

How an epoch runs depends on what is frozen (`mode`):
- features: the backbone never trains and augmentation is none/flip: pooled features are
  computed once (and once more for the mirrored images with flip) and the head trains on
  them; no backbone pass per epoch.
- prefix:   everything below a block boundary (--freeze-to) is frozen and augmentation is
  none/flip: the frozen prefix's output maps are computed once (fp16, in memory or on
  disk) and each epoch runs only the trainable suffix and the head. With flip the cached
  maps are mirrored, a cheap stand-in for mirroring the image (not exact).
- images:   every epoch decodes and augments the images and runs the network (the frozen
  prefix without autograd).
Validation images are never augmented, so their frozen prefix is computed once too.

Under torchrun (WORLD_SIZE > 1) the same run is data-parallel: every rank trains on its
slice of each global batch through DistributedDataParallel and only rank 0 writes; see
tlearn.ddp for how it stays equal to a single process.

Nothing here prints: progress and results go through the `events` callback as
(name, dict) pairs, and the CLI renders them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlearn import checkpoint as ckpt
from tlearn.backbone.cut import cut_spec, feature_dim
from tlearn.backbone.layers import resolve_layers
from tlearn.backbone.transfer import TransferNet
from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.spec import DEFAULT_MODEL
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.groups import GroupPlan, apply_freeze, build_optimizer, plan_groups, set_train_mode
from tlearn.heads.neural import NNHead, head_config
from tlearn.runtime.augment import CACHEABLE_AUGMENTS, train_transform
from tlearn.runtime.device import resolve_device
from tlearn.runtime.loader import image_loader
from tlearn.runtime.transforms import eval_transform
from tlearn.traincache import TensorCache, compute_cache
from tlearn.trainsetup import (
    DEFAULT_LR,
    HISTORY_COLUMNS,
    Events,
    NNFitResult,
    TrainOptions,
    _fingerprint,
    check_options,
    default_augment,
    load_datasets,
)

# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, phases: Sequence[tuple[int, int]], warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, restarted at each phase (the head-only
    --freeze-epochs phase, then the rest), as fastai's fine_tune does."""
    for start, end in phases:
        if start <= step < end:
            s, n = step - start, end - start
            w = min(warmup, max(n - 1, 0))
            if s < w:
                return (s + 1) / (w + 1)
            return 0.5 * (1 + math.cos(math.pi * (s - w) / max(n - w, 1)))
    return 0.0


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31 - 1)


# ----------------------------------------------------------------------------- the run


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Step(nn.Module):
    """One training forward of the run's mode, as a module DistributedDataParallel wraps
    (it holds the network, so parameter names stay model.* and head.* inside it)."""

    def __init__(self, run: _Run):
        super().__init__()
        self.net = run.net
        object.__setattr__(self, "_run", run)  # not a module: not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run._forward_train(x)


class _Run:
    def __init__(self, settings: Settings, out_dir: Path, run, events: Events | None, dist=None):
        from tlearn.core.options import RunOptions

        self.s = settings
        self.o = TrainOptions(**settings.options)
        self.out_dir = out_dir
        self.run = run or RunOptions()
        self.dist = dist  # tlearn.ddp.Dist under torchrun, else None
        self.emit = events or (lambda name, data: None)
        if dist is not None and not dist.main:  # only rank 0 reports
            self.emit = lambda name, data: None
        self.ddp: nn.Module | None = None
        self.ddp_params: tuple[str, ...] = ()
        self.new_skipped: list[Skipped] = []  # found by this rank in an epoch (torchrun)
        self.skipped: list[Skipped] = []
        self.warnings: list[str] = []
        self.history: list[dict] = []
        self.best: dict | None = None  # {"epoch", "val_acc", "val_loss"}
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped_early = False
        self.start_epoch = 0
        self.step = 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from tlearn.backbone.weights import open_backbone

        s, o = self.s, self.o
        check_options(o)
        self.train_set, self.val_set = load_datasets(
            s.data, val=s.val, val_split=s.val_split, labels_csv=s.labels_csv, seed=s.seed
        )
        self.warnings += self.train_set.warnings + (self.val_set.warnings if self.val_set else [])
        self.skipped += self.train_set.skipped + (self.val_set.skipped if self.val_set else [])
        self.classes = list(self.train_set.classes)
        self.fingerprint = _fingerprint(self.train_set, self.val_set)
        self.device = resolve_device(self.run.device)
        if self.run.batch_size < 1:
            raise UsageError(f"--batch-size {self.run.batch_size}: must be at least 1")
        self.batch_size = s.batch_size
        if self.dist is not None and self.batch_size % self.dist.world:
            w = self.dist.world
            raise UsageError(
                f"--batch-size {self.batch_size} is the global batch, split evenly over the "
                f"{w} processes: it must be a multiple of {w} (e.g. "
                f"{max(w, self.batch_size // w * w)} or {(self.batch_size // w + 1) * w})"
            )

        backbone = open_backbone(s.model, s.weights, s.seed)
        self.backbone = backbone
        layers = resolve_layers(backbone.model, s.layers)
        self.spec = cut_spec(backbone, layers, s.pool)
        self.data_config = backbone.data_config
        size = int(self.data_config["input_size"][1])
        net = TransferNet(backbone.model, layers, s.pool, None, size)
        self.feature_dim = feature_dim(net, net.input_shape)
        self.head_cfg = head_config(o.head, hidden=o.hidden, dropout=o.dropout, batchnorm=o.head_bn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            net.head = NNHead(self.head_cfg, self.feature_dim, len(self.classes))
        self.net = net
        self.lr = o.lr if o.lr is not None else DEFAULT_LR[o.optimizer]
        self.plan: GroupPlan = plan_groups(
            net,
            lr=self.lr,
            freeze=o.freeze,
            freeze_to=o.freeze_to,
            layer_decay=o.layer_decay,
            lr_groups=o.lr_groups,
        )
        self.warnings += self.plan.notes
        if o.freeze_epochs and not self.plan.backbone_trains:
            raise UsageError(
                "--freeze-epochs: nothing in the backbone trains after the head-only epochs; "
                "add --freeze-to LAYER, --freeze none or --layer-decay"
            )
        self.augment = o.augment or default_augment(self.plan.backbone_trains)
        apply_freeze(net, self.plan)
        self.mutable = self._mutable_names()
        # Largest chain prefix whose parameters are all frozen for the whole run.
        self.split = 0
        if net.chain is not None and o.bn == "frozen":
            trainable = self.plan.trainable_params
            for i, (name, m) in enumerate(net.chain):
                if any(f"model.{name}.{p}" in trainable for p, _ in m.named_parameters()):
                    break
                self.split = i + 1
        net.split = self.split
        cacheable = o.cache != "off" and o.bn == "frozen"
        if not self.plan.backbone_trains and cacheable and self.augment in CACHEABLE_AUGMENTS:
            self.mode = "features"
        elif cacheable and 0 < self.split and self.augment in CACHEABLE_AUGMENTS:
            self.mode = "prefix"
        else:
            self.mode = "images"
        net.to(self.device)
        self.optimizer = build_optimizer(
            net,
            self.plan,
            optimizer=o.optimizer,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
        )
        self._amp()
        n = len(self.train_set)
        self.drop_lone = n % self.batch_size == 1 and n > 1
        self.steps_per_epoch = n // self.batch_size if self.drop_lone else -(-n // self.batch_size)
        spe = self.steps_per_epoch
        f = o.freeze_epochs
        self.phases = [(0, f * spe), (f * spe, o.epochs * spe)] if f else [(0, o.epochs * spe)]
        self.warmup_steps = int(round(o.warmup_epochs * spe))

    def _amp(self) -> None:
        self.scaler = None
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        else:
            import contextlib

            self.autocast = contextlib.nullcontext

    def _mutable_names(self) -> set[str]:
        """state_dict keys training can change: trainable parameters, the head, and the
        buffers (BatchNorm statistics) of used modules that run in train mode."""
        from tlearn.backbone.transfer import execution_order
        from tlearn.groups import frozen_modules

        frozen_ids = {id(m) for m in frozen_modules(self.net)} if self.o.bn == "frozen" else set()
        frozen = [n for n, m in self.net.named_modules() if id(m) in frozen_ids]
        used = set(execution_order(self.net))
        out = set(self.plan.trainable_params)
        for name, m in self.net.named_modules():
            in_frozen = any(name == f or name.startswith(f + ".") for f in frozen)
            is_head = name == "head" or name.startswith("head.")
            if is_head or (name in used and not in_frozen):
                prefix = f"{name}." if name else ""
                out.update(prefix + b for b, _ in m.named_buffers(recurse=False))
        return out

    def mutable_state(self) -> dict[str, torch.Tensor]:
        sd = self.net.state_dict()
        return {k: v.detach().clone() for k, v in sd.items() if k in self.mutable}

    def load_mutable(self, tensors: dict[str, torch.Tensor]) -> None:
        want = set(self.mutable)
        if set(tensors) != want:
            raise ArtifactError(
                "the checkpoint's tensors do not match this network (settings changed?); "
                "start a new run"
            )
        sd = self.net.state_dict()
        for k, v in tensors.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ArtifactError(f"checkpoint tensor {k} has the wrong shape; start a new run")
        self.net.load_state_dict(tensors, strict=False)

    # ------------------------------------------------------------------ caches

    def build_caches(self) -> None:
        self.train_cache = self.train_flip = self.val_cache = None
        self.cache_tmp: Path | None = None
        disk = None
        if self.o.cache == "disk" and self.mode != "images":
            base = self.o.cache_dir or None
            if base:
                Path(base).mkdir(parents=True, exist_ok=True)
            self.cache_tmp = Path(tempfile.mkdtemp(prefix="tlearn-cache-", dir=base))
            disk = self.cache_tmp
        net = self.net
        net.eval()
        if self.mode == "features" or (
            self.mode == "images"
            and not self.plan.backbone_trains
            and self.o.bn == "frozen"
            and self.o.cache != "off"
        ):
            level_fn, dtype = net.features, torch.float32
        elif self.split > 0 and self.o.cache != "off":
            level_fn, dtype = net.forward_prefix, torch.float16
        else:
            level_fn = None
        self.val_level = None
        if self.mode in ("features", "prefix"):
            self.train_cache, self.train_flip = self._cache(
                level_fn,
                self.train_set.paths,
                dtype=dtype,
                flip=self.augment == "flip" and self.mode == "features",
                disk_dir=disk,
                stage="cache train",
                share=True,
            )
        if self.val_set is not None and len(self.val_set) and level_fn is not None:
            self.val_level = "features" if level_fn == net.features else "prefix"
            self.val_cache, _ = self._cache(
                level_fn,
                self.val_set.paths,
                dtype=dtype,
                disk_dir=None,
                stage="cache val",
                share=False,
            )
        self.y_train = torch.as_tensor(self.train_set.labels, dtype=torch.long)
        if self.val_set is not None:
            self.y_val = torch.as_tensor(self.val_set.labels, dtype=torch.long)

    def _cache(self, fn, paths, *, dtype, disk_dir, stage, share, flip=False):
        """compute_cache in one process. Under torchrun each rank computes its shard of
        whole batches (the batches of a single run); `share`: then every rank gets every
        rank's rows (the training cache, sampled anew each epoch), else it keeps its own
        shard (validation runs in the same shards)."""
        kw = dict(
            device=self.device,
            batch_size=self.run.batch_size,
            workers=self.run.workers,
            dtype=dtype,
            flip=flip,
            progress=self.run.bar(stage),
            autocast=self.autocast,
        )
        if self.dist is None:
            return compute_cache(
                fn, paths, self.data_config, skipped=self.skipped, disk_dir=disk_dir, **kw
            )
        d = self.dist
        start, stop = d.shard(len(paths), self.run.batch_size)
        own, local, skipped, payload = None, (None, None), [], None
        try:
            local = compute_cache(
                fn,
                paths[start:stop],
                self.data_config,
                skipped=skipped,
                disk_dir=None if share else disk_dir,
                allow_empty=True,
                **kw,
            )
            x = local[0]
            payload = {
                "skipped": [[sk.path, sk.reason] for sk in skipped],
                "indices": (x.indices + start).tolist(),
                "shape": list(x.data.shape[1:]) if len(x) else None,
            }
        except Exception as e:
            own = e
        infos = d.check(own, payload)
        for info in infos:  # in rank order: input order, as a single run lists them
            self.skipped += [Skipped(*sk) for sk in info["skipped"]]
        if not share:
            for c in local:
                if c is not None:
                    c.indices = c.indices + start
            return local
        indices = np.asarray([i for info in infos for i in info["indices"]], dtype=np.int64)
        if not len(indices):
            raise DataError("no readable images to train on")  # every rank alike
        shape = (len(indices), *next(i["shape"] for i in infos if i["shape"] is not None))
        counts = [len(info["indices"]) for info in infos]

        def shared(c: TensorCache | None, name: str) -> TensorCache:
            if disk_dir is None:
                dest = torch.empty(shape, dtype=dtype)
            else:
                dest = np.lib.format.open_memmap(
                    disk_dir / f"{name}.npy",
                    mode="w+",
                    dtype=np.float16 if dtype == torch.float16 else np.float32,
                    shape=shape,
                )
            d.share_rows(counts, None if c is None else c.data, dest)
            if disk_dir is not None:
                dest.flush()
            return TensorCache(indices, dest)

        return shared(local[0], "x"), (shared(local[1], "x_flip") if flip else None)

    def cleanup(self) -> None:
        if getattr(self, "cache_tmp", None) is not None:
            shutil.rmtree(self.cache_tmp, ignore_errors=True)

    # ------------------------------------------------------------------ loss

    def _criterion(self, reduction: str = "mean") -> nn.Module:
        weight = None
        if self.o.class_weight == "balanced":
            counts = np.bincount(np.asarray(self.train_set.labels), minlength=len(self.classes))
            w = len(self.train_set.labels) / (len(self.classes) * np.maximum(counts, 1))
            weight = torch.as_tensor(w, dtype=torch.float32, device=self.device)
        return nn.CrossEntropyLoss(
            weight=weight, label_smoothing=self.o.label_smoothing, reduction=reduction
        )

    # ------------------------------------------------------------------ epochs

    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.phases, self.warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return self.lr * f

    def _batches_cached(self, g: torch.Generator):
        cache = self.train_cache
        n = len(cache)
        order = torch.randperm(n, generator=g)
        flip_pick = torch.rand(n, generator=g) < 0.5
        stop = n - 1 if n % self.batch_size == 1 and n > 1 else n
        for i in range(0, stop, self.batch_size):
            rows = order[i : i + self.batch_size]
            if self.dist is not None:  # this rank's slice of the global batch (maybe empty)
                rows = self.dist.mine(rows)
            x = cache.get(rows)
            if self.augment == "flip":
                pick = flip_pick[rows]
                if self.train_flip is not None:  # features of the mirrored images: exact
                    x = torch.where(pick[:, None], self.train_flip.get(rows), x)
                else:  # mirrored prefix maps: approximate
                    x = torch.where(pick.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)
            y = self.y_train[torch.as_tensor(cache.indices[rows.numpy()])]
            yield x, y

    def _batches_images(self, g: torch.Generator, g_local: torch.Generator):
        n = len(self.train_set)
        order = torch.randperm(n, generator=g).tolist()
        if self.drop_lone:
            order = order[:-1]
        if self.dist is not None:
            yield from self._batches_images_dist(order, g_local)
            return
        loader = image_loader(
            self.train_set.paths,
            self.transform,
            batch_size=self.batch_size,
            workers=self.run.workers,
            order=order,
            generator=g,
            min_size=resize_target(self.data_config),
            device=self.device,
        )
        seen = {s.path for s in self.skipped}
        for idx, x, bad in loader:
            for i, r in bad:
                if str(self.train_set.paths[i]) not in seen:
                    seen.add(str(self.train_set.paths[i]))
                    self.skipped.append(Skipped(str(self.train_set.paths[i]), r))
            if x is None:
                continue
            yield x, self.y_train[torch.as_tensor(idx)]

    def _batches_images_dist(self, order: list[int], g_local: torch.Generator):
        """This rank's slice of every global batch, one item per global step; (None, empty
        labels) where the slice is empty or none of its images could be read."""
        bs = self.batch_size
        slices = [list(self.dist.mine(order[i : i + bs])) for i in range(0, len(order), bs)]
        loader = image_loader(
            self.train_set.paths,
            self.transform,
            batch_size=bs // self.dist.world,
            workers=self.run.workers,
            batches=[sl for sl in slices if sl],
            generator=g_local,
            min_size=resize_target(self.data_config),
            device=self.device,
        )
        batches = iter(loader)
        seen = {sk.path for sk in self.skipped}
        none = torch.zeros(0, dtype=torch.long)
        for sl in slices:
            if not sl:
                yield None, none
                continue
            idx, x, bad = next(batches)
            for i, r in bad:
                if str(self.train_set.paths[i]) not in seen:
                    seen.add(str(self.train_set.paths[i]))
                    self.skipped.append(Skipped(str(self.train_set.paths[i]), r))
                    self.new_skipped.append(Skipped(str(self.train_set.paths[i]), r))
            if x is None:
                yield None, none
            else:
                yield x, self.y_train[torch.as_tensor(idx)]

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
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

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward and one optimizer step (through the AMP grad scaler on CUDA)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step += 1

    def train_epoch(self, epoch: int) -> dict:
        o = self.o
        head_only = epoch < o.freeze_epochs
        apply_freeze(self.net, self.plan, head_only=head_only)
        set_train_mode(self.net, o.bn)
        seed = _epoch_seed(self.s.seed, epoch)
        g = torch.Generator().manual_seed(seed)  # the global order: the same on every rank
        local = seed if self.dist is None else self.dist.seed(seed)  # augmentation, dropout
        torch.manual_seed(local)
        random.seed(local)
        g_local = g if self.dist is None else torch.Generator().manual_seed(local)
        if self.mode == "images":
            batches = self._batches_images(g, g_local)
        else:
            batches = self._batches_cached(g)
        t0 = time.perf_counter()
        n_total = len(self.train_set)
        self.emit("epoch_start", {"epoch": epoch + 1, "epochs": o.epochs, "total": n_total})
        if self.dist is None:
            total_loss, correct, seen, lr_now = self._steps(batches, epoch, t0)
        else:
            total_loss, correct, seen, lr_now = self._steps_dist(batches, epoch, t0)
        # Keep the step count exact even when images were skipped.
        self.step = (epoch + 1) * self.steps_per_epoch
        dt = time.perf_counter() - t0
        return {
            "epoch": epoch + 1,
            "lr": lr_now,
            "train_loss": total_loss / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "seconds": dt,
            "images_per_s": seen / dt if dt > 0 else 0.0,
        }

    def _steps(self, batches, epoch: int, t0: float) -> tuple[float, int, int, float]:
        """One process: a step per batch on the mean loss of the batch."""
        criterion = self._criterion()
        total_loss, correct, seen = 0.0, 0, 0
        n_total = len(self.train_set)
        lr_now = self.lr
        for x, y in batches:
            lr_now = self._set_lr()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self._forward_train(x)
                loss = criterion(logits.float(), y)
            self._optimizer_step(loss)
            b = len(y)
            total_loss += float(loss.detach()) * b
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += b
            dt = time.perf_counter() - t0
            self.emit(
                "batch",
                {
                    "epoch": epoch + 1,
                    "done": seen,
                    "total": n_total,
                    "loss": total_loss / seen,
                    "acc": correct / seen,
                    "images_per_s": seen / dt if dt > 0 else 0.0,
                },
            )
        return total_loss, correct, seen, lr_now

    # ------------------------------------------------------------------ torchrun

    def _ddp_model(self) -> nn.Module:
        """The DistributedDataParallel wrapper for the parameters that train now. DDP
        fixes its parameters when it is built: after --freeze-epochs unfreezes more of the
        network it is built anew (the old one, and its gradient hooks, dropped first)."""
        trainable = tuple(n for n, p in self.net.named_parameters() if p.requires_grad)
        if self.ddp is None or trainable != self.ddp_params:
            self.ddp = None
            self.ddp = self.dist.wrap(_Step(self), self.device)
            self.ddp_params = trainable
        return self.ddp

    def _pad(self, x: torch.Tensor | None, y: torch.Tensor, size: int):
        """Fill a rank's slice up to `size` rows that the loss ignores: a rank takes part
        in every step (DDP reduces gradients from all ranks), and BatchNorm in train mode
        needs two rows."""
        if x is None or len(y) == 0:
            shape = tuple(self.data_config["input_size"]) if x is None else tuple(x.shape[1:])
            dtype = torch.float32 if x is None else x.dtype
            return torch.zeros((size, *shape), dtype=dtype), torch.zeros(size, dtype=torch.long)
        k = size - len(y)
        return (
            torch.cat([x, x[:1].expand(k, *x.shape[1:])]),
            torch.cat([y, y[:1].expand(k)]),
        )

    def _steps_dist(self, batches, epoch: int, t0: float) -> tuple[float, int, int, float]:
        """Under torchrun: this rank's slice of each global batch. The slice's loss is its
        share of the global batch's mean loss, times WORLD_SIZE (DDP averages gradients
        over ranks): the step equals the single-process step on the global batch, class
        weights and unevenly split or unreadable images included."""
        d = self.dist
        model = self._ddp_model()
        criterion = self._criterion(reduction="none")
        weight = None if criterion.weight is None else criterion.weight.cpu().double()
        train_bn = [  # BatchNorm layers that run in train mode (batch statistics)
            m
            for name, m in self.net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training
            and f"{name}.running_mean" in self.mutable
        ]
        min_rows = 2 if train_bn else 1
        self.new_skipped = []
        total_loss, correct, seen, done = 0.0, 0, 0, 0
        shown_loss, shown_w = 0.0, 0.0
        n_total = len(self.train_set)
        lr_now = self.lr
        for x, y in batches:
            real = 0 if x is None else len(y)
            w_local = float(weight[y].sum()) if weight is not None else float(real)
            n_glob, w_glob = d.sum([real, w_local])
            if n_glob == 0:  # no readable image in this global batch: every rank skips it
                continue
            if real < min_rows:
                x, y = self._pad(x, y, min_rows)
            mask = (torch.arange(len(y)) < real).to(self.device, torch.float32)
            lr_now = self._set_lr()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                logits = model(x)
                per_image = criterion(logits.float(), y)
            local_sum = (per_image * mask).sum()
            loss = local_sum * (d.world / w_glob)
            self._optimizer_step(loss)
            part = float(local_sum.detach())
            total_loss += part * n_glob / w_glob  # summed over ranks: mean loss x batch size
            correct += int(((logits.detach().argmax(1) == y).float() * mask).sum())
            seen += real
            done += int(n_glob)
            shown_loss, shown_w = shown_loss + part, shown_w + w_local
            dt = time.perf_counter() - t0
            self.emit(  # rank 0's own slices: the global numbers come at the epoch's end
                "batch",
                {
                    "epoch": epoch + 1,
                    "done": done,
                    "total": n_total,
                    "loss": shown_loss / shown_w if shown_w else 0.0,
                    "acc": correct / seen if seen else 0.0,
                    "images_per_s": done / dt if dt > 0 else 0.0,
                },
            )
        total_loss, correct, seen = d.sum([total_loss, correct, seen])
        # Trainable BatchNorm layers normalise with the statistics of each rank's slice and
        # update their running statistics per rank: average those, so every rank (and the
        # saved model) holds the same.
        bufs = [
            b
            for m in train_bn
            for name, b in m.named_buffers(recurse=False)
            if b.is_floating_point() and name in ("running_mean", "running_var")
        ]
        if bufs:
            d.average(bufs)
        if self.mode == "images":  # unreadable images found by any rank, for the report
            have = {sk.path for sk in self.skipped}
            for info in d.gather([[sk.path, sk.reason] for sk in self.new_skipped]):
                for path, reason in info:
                    if path not in have:
                        have.add(path)
                        self.skipped.append(Skipped(path, reason))
        return total_loss, int(correct), int(seen), lr_now

    def validate(self) -> tuple[float, float, np.ndarray, np.ndarray] | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        net = self.net
        net.eval()
        losses, preds, ys = [], [], []
        with torch.inference_mode():
            if self.val_cache is not None:
                cache = self.val_cache
                for i in range(0, len(cache), self.run.batch_size):
                    rows = torch.arange(i, min(i + self.run.batch_size, len(cache)))
                    x = cache.get(rows).to(self.device).float()
                    y = self.y_val[torch.as_tensor(cache.indices[rows.numpy()])]
                    with self.autocast():
                        if self.val_level == "features":
                            logits = net.head(x)
                        else:
                            logits = net.forward_from_prefix(x)
                    losses.append(
                        nn.functional.cross_entropy(logits.float().cpu(), y, reduction="sum")
                    )
                    preds.append(logits.argmax(1).cpu())
                    ys.append(y)
            else:
                start, stop = 0, len(self.val_set)
                if self.dist is not None:  # this rank's whole batches of the list
                    start, stop = self.dist.shard(stop, self.run.batch_size)
                loader = image_loader(
                    self.val_set.paths[start:stop],
                    eval_transform(self.data_config),
                    batch_size=self.run.batch_size,
                    workers=self.run.workers,
                    min_size=resize_target(self.data_config),
                    device=self.device,
                )
                for idx, x, _bad in loader:
                    if x is None:
                        continue
                    y = self.y_val[torch.as_tensor(idx) + start]
                    with self.autocast():
                        logits = net(x.to(self.device))
                    losses.append(
                        nn.functional.cross_entropy(logits.float().cpu(), y, reduction="sum")
                    )
                    preds.append(logits.argmax(1).cpu())
                    ys.append(y)
        if self.dist is not None:
            # Every rank gets every shard's batch sums and predictions, in input order, so
            # all compute the same numbers (and take the same early-stopping decisions).
            mine = {
                "loss": [float(v) for v in losses],
                "y": torch.cat(ys).tolist() if ys else [],
                "p": torch.cat(preds).tolist() if preds else [],
            }
            infos = self.dist.gather(mine)
            losses = [torch.tensor(v, dtype=torch.float32) for i in infos for v in i["loss"]]
            ys = [torch.tensor(i["y"], dtype=torch.long) for i in infos if i["y"]]
            preds = [torch.tensor(i["p"], dtype=torch.long) for i in infos if i["p"]]
        if not ys:
            return None
        y = torch.cat(ys)
        p = torch.cat(preds)
        loss = float(torch.stack(losses).sum()) / len(y)
        return loss, float((p == y).float().mean()), y.numpy(), p.numpy()

    # ------------------------------------------------------------------ checkpoints

    def state(self, epoch_done: int) -> dict:
        return {
            "format": "tlearn-checkpoint",
            "format_version": 1,
            "epoch": epoch_done,
            "step": self.step,
            "settings": self.s.to_dict(),
            "fingerprint": self.fingerprint,
            "history": self.history,
            "best": self.best,
            "stopped_early": self.stopped_early,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save_checkpoint(self, epoch_done: int) -> None:
        ckpt.save_checkpoint(
            self.out_dir,
            self.state(epoch_done),
            self.mutable_state(),
            self.best_weights,
            self.optimizer,
        )
        from tlearn.core.atomic import atomic_file

        with atomic_file(self.out_dir / ckpt.CHECKPOINT_DIR / "history.csv", "w") as f:
            f.write(history_csv(self.history))

    def restore(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise UsageError(
                "the images differ from those the checkpoint was trained on (files added, "
                "removed or relabelled); resume with the same data, or start a new run"
            )
        weights = ckpt.load_tensors(self.out_dir, ckpt.WEIGHTS)
        if weights is None:
            raise ArtifactError(
                f"{self.out_dir}: checkpoint has no {ckpt.WEIGHTS}; start a new run"
            )
        self.load_mutable(weights)
        self.best_weights = ckpt.load_tensors(self.out_dir, ckpt.BEST)
        opt_tensors = ckpt.load_tensors(self.out_dir, ckpt.OPTIMIZER) or {}
        ckpt.optimizer_from_flat(self.optimizer, opt_tensors, state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        self.stopped_early = bool(state.get("stopped_early"))

    # ------------------------------------------------------------------ loop

    def loop(self) -> None:
        o = self.o
        self.transform = train_transform(self.data_config, self.augment)
        since_best = 0
        if self.best is not None and self.history:
            since_best = self.history[-1]["epoch"] - self.best["epoch"]
        for epoch in range(self.start_epoch, o.epochs):
            if self.stopped_early:
                break
            row = self.train_epoch(epoch)
            v = self.validate()
            row["val_loss"], row["val_acc"] = (v[0], v[1]) if v else (None, None)
            self.history.append(row)
            improved = False
            if v is None:
                improved = True  # without validation the last epoch is kept
            elif (
                self.best is None
                or v[1] > self.best["val_acc"]
                or (v[1] == self.best["val_acc"] and v[0] < self.best["val_loss"])
            ):
                improved = True
            if improved:
                self.best = {
                    "epoch": epoch + 1,
                    "val_acc": row["val_acc"],
                    "val_loss": row["val_loss"],
                }
                self.best_weights = self.mutable_state()
                since_best = 0
            else:
                since_best += 1
            if (
                o.patience is not None
                and v is not None
                and epoch >= o.freeze_epochs
                and since_best >= o.patience
                and epoch + 1 < o.epochs
            ):
                self.stopped_early = True
            self._write(lambda e=epoch: self.save_checkpoint(e + 1))
            self.emit(
                "epoch_end",
                {**row, "best": improved and v is not None, "stopped_early": self.stopped_early},
            )

    def _write(self, fn):
        """fn() writes files: in one process just call it; under torchrun rank 0 calls it
        and every rank waits for its status (an error fails every rank)."""
        if self.dist is None:
            return fn()
        return self.dist.on_main(fn)

    # ------------------------------------------------------------------ final model

    def finish(self, t0: float) -> NNFitResult | None:
        from tlearn.modeldir import BACKBONE_FILE, build_config, save_model
        from tlearn.report.metrics import classification_metrics

        if self.best_weights is not None:
            self.net.load_state_dict(self.best_weights, strict=False)
        v = self.validate()

        def write() -> dict | None:  # the model directory (on rank 0 under torchrun)
            val_metrics = None
            if v is not None:
                val_metrics = classification_metrics(v[2], v[3], self.classes)
            backbone_changed = any(k.startswith("model.") for k in self.mutable)
            head_sd = self.net.head.state_dict()
            head_tensors = {k: t.detach().cpu().numpy() for k, t in head_sd.items()}
            extra = {
                "history.csv": history_csv(self.history).encode(),
                "curves.png": curves_png(self.history),
            }
            if backbone_changed:
                from safetensors.numpy import save

                sd = {
                    k: v.detach().cpu().contiguous().numpy()
                    for k, v in self.net.model.state_dict().items()
                }
                extra[BACKBONE_FILE] = save(sd)
            train_info = {
                "n_images": len(self.train_set),
                "n_val": len(self.val_set) if self.val_set else 0,
                "settings": self.s.to_dict(),
                "augment": self.augment,
                "mode": self.mode,
                "lr": self.lr,
                "freeze_to": self.plan.freeze_to,
                "layer_decay": self.plan.layer_decay,
                "groups": [r.to_dict() for r in self.plan.rows],
                "epochs_run": len(self.history),
                "best_epoch": self.best["epoch"] if self.best else None,
                "stopped_early": self.stopped_early,
            }
            config = build_config(
                cut=self.spec,
                data_config=self.data_config,
                classes=self.classes,
                head=self.head_cfg,
                feature_dim=self.feature_dim,
                backbone={
                    "trained": backbone_changed,
                    "file": BACKBONE_FILE if backbone_changed else None,
                },
                train=train_info,
            )
            metrics = {"validation": val_metrics, "history": self.history}
            save_model(
                self.out_dir, config, head_tensors, metrics=metrics, force=True, extra_files=extra
            )
            return val_metrics

        val_metrics = self._write(write)
        if self.dist is not None and not self.dist.main:
            return None
        return NNFitResult(
            out_dir=str(self.out_dir),
            classes=self.classes,
            n_train=len(self.train_set),
            n_val=len(self.val_set) if self.val_set else 0,
            groups=[r.to_dict() for r in self.plan.rows],
            mode=self.mode,
            history=self.history,
            best_epoch=self.best["epoch"] if self.best else None,
            val_metrics=val_metrics,
            stopped_early=self.stopped_early,
            skipped=self.skipped,
            warnings=self.warnings,
            seconds=time.perf_counter() - t0,
            settings={**self.s.to_dict(), "augment": self.augment},
        )

    def describe(self) -> dict:
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
            "optimizer": self.o.optimizer,
            "epochs": self.o.epochs,
            "device": str(self.device),
        }


def curves_png(history: list[dict]) -> bytes:
    """curves.png for the model directory: loss and accuracy per epoch."""
    import tempfile

    from tlearn.report.plots import plot_curves

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "history.csv"
        src.write_text(history_csv(history), encoding="utf-8")
        return plot_curves(src, Path(tmp) / "curves.png").read_bytes()


def history_csv(history: list[dict]) -> str:
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        vals = []
        for c in HISTORY_COLUMNS:
            v = row.get(c)
            vals.append("" if v is None else (str(v) if c == "epoch" else f"{v:.6g}"))
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry points


def fit_nn(
    data,
    out_dir,
    *,
    options: TrainOptions | None = None,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers: str | Sequence[str] | None = None,
    pool: str = "avg",
    val=None,
    val_split: float | None = None,
    labels_csv=None,
    seed: int = 0,
    force: bool = False,
    run=None,
    events: Events | None = None,
) -> NNFitResult | None:
    """Train a new neural head (and optionally part of the backbone) on an image folder and
    write the model directory `out_dir`. A checkpoint in out_dir/checkpoint/ is written at
    the end of every epoch; `resume_nn` continues from it.

    Under torchrun every rank trains its share of each global batch (`run.batch_size` is
    the global batch) and rank 0 writes; ranks other than 0 return None."""
    from tlearn.core.options import RunOptions

    t0 = time.perf_counter()
    options = options or TrainOptions()
    check_options(options)
    run = run or RunOptions()
    out_dir = Path(out_dir)
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    settings = Settings(
        data=_abs(data),
        val=_abs(val),
        val_split=val_split,
        labels_csv=_abs(labels_csv),
        model=model,
        weights=weights if weights in ("auto", "none") else _abs(weights),
        layers=list(layers) if layers else None,
        pool=pool,
        seed=seed,
        batch_size=run.batch_size,
        options=options.to_dict(),
    )

    def prepare(run, dist) -> _Run:
        if out_dir.exists() and not force:
            if ckpt.has_checkpoint(out_dir):
                raise ArtifactError(
                    f"{out_dir} holds an unfinished training run; continue it with --resume "
                    f"{out_dir}, or pass --force to start over"
                )
            raise ArtifactError(f"{out_dir} already exists; choose another -o or pass --force")
        r = _Run(settings, out_dir, run, events, dist)
        r.setup()
        return r

    def start_over() -> None:
        if force and out_dir.exists() and ckpt.has_checkpoint(out_dir):
            shutil.rmtree(out_dir / ckpt.CHECKPOINT_DIR)

    return _start(prepare, start_over, run, t0)


def resume_nn(
    model_dir,
    data=None,
    *,
    changed: dict | None = None,
    run=None,
    events: Events | None = None,
) -> NNFitResult | None:
    """Continue an interrupted run from its last checkpoint, with its saved settings.
    `changed`: settings the caller asked for explicitly; they must equal the saved ones.
    Under torchrun every rank restores the same checkpoint (the model directory must be
    on a filesystem they share); ranks other than 0 return None."""
    from tlearn.core.options import RunOptions

    t0 = time.perf_counter()
    model_dir = Path(model_dir)

    def prepare(run, dist) -> _Run:
        state = ckpt.read_state(model_dir)
        try:
            saved = Settings(**state["settings"])
            TrainOptions(**saved.options)
        except (KeyError, TypeError) as e:
            raise ArtifactError(
                f"{model_dir}: checkpoint settings are incomplete or unknown ({e}); start a new run"
            ) from None
        if data is not None and _abs(data) != saved.data:
            raise UsageError(
                f"--resume: the run was trained on {saved.data}, not {_abs(data)}; give the "
                "same data or start a new run"
            )
        for key, value in (changed or {}).items():
            have = saved.options.get(key, getattr(saved, key, None))
            if key in ("val", "labels_csv", "weights") and value is not None:
                value = _abs(value) if value not in ("auto", "none") else value
            if isinstance(value, (list, tuple)):
                value = list(value)
            if value != have:
                raise UsageError(
                    f"--resume continues the same run: --{key.replace('_', '-')} {value} "
                    f"differs from the checkpoint's {'default' if have is None else have}; "
                    "drop the option or start a new run"
                )
        run = dataclasses.replace(run, batch_size=saved.batch_size)
        r = _Run(saved, model_dir, run, events, dist)
        r.setup()
        r.restore(state)
        return r

    return _start(prepare, None, run or RunOptions(), t0)


def _start(prepare, before_training, run, t0: float) -> NNFitResult | None:
    """prepare(run, dist) -> the set-up _Run, then train it: in this process, or under
    torchrun as one rank of a process group, with a status exchange after the setup (a
    rank's error fails every rank with one message, and all ranks must see the same
    images and checkpoint)."""
    from tlearn.core.system import dist_env

    env = dist_env()
    if env is None:
        r = prepare(run, None)
        if before_training is not None:
            before_training()
        return _execute(r, t0)

    from tlearn.ddp import Dist, check_one_gpu_per_process
    from tlearn.scale.group import ProcessGroup

    with ProcessGroup(env) as group:
        dist = Dist(env, group)
        r, own = None, None
        try:
            run = group.run_options(run)
            check_one_gpu_per_process(env, run.device)
            r = prepare(run, dist)
        except Exception as e:
            own = e
        agree = None if r is None else [r.fingerprint, r.start_epoch, r.step]
        dist.check(own, agree=agree)
        if before_training is not None:
            dist.on_main(before_training)
        return _execute(r, t0)


def _execute(r: _Run, t0: float) -> NNFitResult | None:
    r.emit("groups", r.describe())
    py_state = random.getstate()
    try:
        # Training reseeds the global generators every epoch (for --resume); put the
        # caller's state back afterwards.
        with torch.random.fork_rng(devices=[]):
            r.build_caches()
            r.loop()
            return r.finish(t0)
    finally:
        random.setstate(py_state)
        r.cleanup()


def _abs(p) -> str | None:
    return None if p is None else os.path.abspath(os.fspath(p))
