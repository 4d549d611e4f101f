"""The optimisation steps under torchrun: DistributedDataParallel over the run's training
forward, each rank's slice of every global batch (padded where BatchNorm needs rows), a
loss scaled so the averaged gradient is the single-process gradient of the global batch,
and at each epoch's end the ranks' BatchNorm statistics averaged and their unreadable
images shared. The design: train.dist."""

from __future__ import annotations

import gc
import inspect
import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tlearn.train.batches import Batches, SkipLog
from tlearn.train.build import Setup
from tlearn.train.checkpoint import TrainState
from tlearn.train.options import Events
from tlearn.train.steps import EpochSums, Stepper

# A performance notice for weights with a dimension of size 1 (depthwise convolutions),
# whose gradients come with other (equivalent) strides.
GRAD_STRIDES_NOTICE = "Grad strides do not match bucket view"


class StepModule(nn.Module):
    """One training forward of the run's mode, as a module DistributedDataParallel wraps
    (it holds the network, so parameter names stay model.* and head.* inside it)."""

    def __init__(self, setup: Setup):
        super().__init__()
        self.net = setup.net
        object.__setattr__(self, "setup", setup)  # not a module: not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.setup.forward_train(x)


def ddp_wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the parameters that require a gradient now.
    Buffers are not broadcast at each step (BatchNorm statistics of trainable layers
    are averaged at the end of each epoch instead)."""
    warnings.filterwarnings("ignore", message=GRAD_STRIDES_NOTICE)
    gc.collect()  # a replaced wrapper's gradient hooks must be gone first
    ids = [device.index] if device.type == "cuda" else None
    # newer torch names it forward_sync_buffers (and deprecates broadcast_buffers)
    sync = "forward_sync_buffers"
    if sync not in inspect.signature(DistributedDataParallel.__init__).parameters:
        sync = "broadcast_buffers"
    return DistributedDataParallel(
        module, device_ids=ids, output_device=ids[0] if ids else None, **{sync: False}
    )


def pad(x: torch.Tensor | None, y: torch.Tensor, size: int, input_size) -> tuple:
    """Fill a rank's slice up to `size` rows that the loss ignores: a rank takes part in
    every step (DDP reduces gradients from all ranks), and BatchNorm in train mode needs
    two rows. `input_size`: the shape of an image, for a slice without any."""
    if x is None or len(y) == 0:
        shape = tuple(input_size) if x is None else tuple(x.shape[1:])
        dtype = torch.float32 if x is None else x.dtype
        return torch.zeros((size, *shape), dtype=dtype), torch.zeros(size, dtype=torch.long)
    k = size - len(y)
    return (
        torch.cat([x, x[:1].expand(k, *x.shape[1:])]),
        torch.cat([y, y[:1].expand(k)]),
    )


class DistStepper(Stepper):
    """Under torchrun: this rank's slice of each global batch. The slice's loss is its
    share of the global batch's mean loss, times WORLD_SIZE (DDP averages gradients over
    ranks): the step equals the single-process step on the global batch, class weights
    and unevenly split or unreadable images included."""

    def __init__(self, setup: Setup, emit: Events, state: TrainState, skips: SkipLog):
        super().__init__(setup, emit, state)
        self.skips = skips
        self.ddp: nn.Module | None = None
        self.ddp_params: tuple[str, ...] = ()

    def model(self) -> nn.Module:
        """The DistributedDataParallel wrapper for the parameters that train now. DDP
        fixes its parameters when it is built: after --freeze-epochs unfreezes more of the
        network it is built anew (the old one, and its gradient hooks, dropped first)."""
        net = self.setup.net
        trainable = tuple(n for n, p in net.named_parameters() if p.requires_grad)
        if self.ddp is None or trainable != self.ddp_params:
            self.ddp = None
            self.ddp = ddp_wrap(StepModule(self.setup), self.setup.device)
            self.ddp_params = trainable
        return self.ddp

    def _train_bn(self) -> list[nn.Module]:
        """BatchNorm layers that run in train mode (batch statistics)."""
        return [
            m
            for name, m in self.setup.net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training
            and f"{name}.running_mean" in self.setup.mutable
        ]

    def run(self, batches: Batches, epoch: int, t0: float) -> EpochSums:
        s, d = self.setup, self.setup.dist
        model = self.model()
        criterion = s.criterion(reduction="none")
        weight = None if criterion.weight is None else criterion.weight.cpu().double()
        train_bn = self._train_bn()
        min_rows = 2 if train_bn else 1
        self.skips.new = []
        total_loss, correct, seen, done = 0.0, 0, 0, 0
        shown_loss, shown_w = 0.0, 0.0
        lr_now = s.lr
        for x, y in batches:
            real = 0 if x is None else len(y)
            w_local = float(weight[y].sum()) if weight is not None else float(real)
            n_glob, w_glob = d.sum([real, w_local])
            if n_glob == 0:  # no readable image in this global batch: every rank skips it
                continue
            if real < min_rows:
                x, y = pad(x, y, min_rows, s.network.data_config["input_size"])
            mask = (torch.arange(len(y)) < real).to(s.device, torch.float32)
            lr_now = self.set_lr()
            logits, per_image, y = self.forward(model, criterion, x, y)
            local_sum = (per_image * mask).sum()
            self.backward(local_sum * (d.world / w_glob))
            part = float(local_sum.detach())
            total_loss += part * n_glob / w_glob  # summed over ranks: mean loss x batch size
            correct += int(((logits.detach().argmax(1) == y).float() * mask).sum())
            seen += real
            done += int(n_glob)
            shown_loss, shown_w = shown_loss + part, shown_w + w_local
            # rank 0's own slices: the global numbers come at the epoch's end
            self.batch_event(
                epoch,
                done,
                shown_loss / shown_w if shown_w else 0.0,
                correct / seen if seen else 0.0,
                t0,
            )
        total_loss, correct, seen = d.sum([total_loss, correct, seen])
        self._average_bn(train_bn)
        if s.mode == "images":  # unreadable images found by any rank, for the report
            self.skips.share(d)
        return EpochSums(total_loss, int(correct), int(seen), lr_now)

    def _average_bn(self, train_bn: list[nn.Module]) -> None:
        """Trainable BatchNorm layers normalise with the statistics of each rank's slice
        and update their running statistics per rank: average those, so every rank (and
        the saved model) holds the same."""
        bufs = [
            b
            for m in train_bn
            for name, b in m.named_buffers(recurse=False)
            if b.is_floating_point() and name in ("running_mean", "running_var")
        ]
        if bufs:
            self.setup.dist.average(bufs)
