"""The optimisation steps of an epoch in one process, and the parts of a step the
torchrun steps (train.ddp) take the same way: the step's learning rate, the forward and
loss under autocast, backward and the optimiser step, the step count, and the progress
event after each batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlearn.train.batches import Batches
from tlearn.train.build import Setup
from tlearn.train.checkpoint import TrainState
from tlearn.train.optim import optimizer_step
from tlearn.train.options import Events


@dataclass
class EpochSums:
    """An epoch's training sums: loss x images, correct predictions, images, and the
    head's learning rate at the last step."""

    loss: float
    correct: int
    seen: int
    lr: float


class Stepper:
    """Takes the steps of the epochs, counting them in `state.step` (over the whole run:
    the learning-rate schedule reads it, checkpoints save it)."""

    def __init__(self, setup: Setup, emit: Events, state: TrainState):
        self.setup = setup
        self.emit = emit
        self.state = state

    # ------------------------------------------------------------------ one step

    def set_lr(self) -> float:
        """The rates of this step in the optimiser; returns the head's."""
        s = self.setup
        return s.schedule.set_lr(s.optimizer, self.state.step, s.lr)

    def forward(
        self, model: Callable, criterion: Callable, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, criterion(logits, y), y on the device) of a batch, under autocast."""
        s = self.setup
        x = x.to(s.device, non_blocking=True)
        y = y.to(s.device, non_blocking=True)
        with s.amp.autocast():
            logits = model(x)
            loss = criterion(logits.float(), y)
        return logits, loss, y

    def backward(self, loss: torch.Tensor) -> None:
        """Backward and one optimiser step."""
        optimizer_step(self.setup.optimizer, self.setup.amp, loss)
        self.state.step += 1

    def batch_event(self, epoch: int, done: int, loss: float, acc: float, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.emit(
            "batch",
            {
                "epoch": epoch + 1,
                "done": done,
                "total": len(self.setup.train_set),
                "loss": loss,
                "acc": acc,
                "images_per_s": done / dt if dt > 0 else 0.0,
            },
        )

    # ------------------------------------------------------------------ an epoch

    def run(self, batches: Batches, epoch: int, t0: float) -> EpochSums:
        """One process: a step per batch on the mean loss of the batch."""
        criterion = self.setup.criterion()
        total_loss, correct, seen = 0.0, 0, 0
        lr_now = self.setup.lr
        for x, y in batches:
            lr_now = self.set_lr()
            logits, loss, y = self.forward(self.setup.forward_train, criterion, x, y)
            self.backward(loss)
            b = len(y)
            total_loss += float(loss.detach()) * b
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += b
            self.batch_event(epoch, seen, total_loss / seen, correct / seen, t0)
        return EpochSums(total_loss, correct, seen, lr_now)
