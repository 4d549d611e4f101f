"""The epochs of a run: each one reseeded from the run's seed, freezing per phase, the
batches of the mode through the steps (one process, or torchrun's), validation, the best
epoch kept, early stopping, and a checkpoint at its end."""

from __future__ import annotations

import time

from tlearn.train.batches import SkipLog, epoch_batches
from tlearn.train.build import Setup
from tlearn.train.checkpoint import TrainState, mutable_state, save
from tlearn.train.ddp import DistStepper
from tlearn.train.dist import write_once
from tlearn.train.frozen import Caches
from tlearn.train.optim import apply_freeze, set_train_mode
from tlearn.train.options import Events
from tlearn.train.schedule import seed_epoch
from tlearn.train.steps import Stepper
from tlearn.train.validate import Validation, validate


class Trainer:
    """Runs the remaining epochs of a set-up run on its filled caches; `state` (what the
    epochs did) grows as they run. train_epoch is the seam tests wrap to stop a run."""

    def __init__(self, setup: Setup, caches: Caches, state: TrainState, emit: Events):
        self.setup = setup
        self.caches = caches
        self.state = state
        self.emit = emit
        self.skips = SkipLog(setup.skipped)
        if setup.dist is None:
            self.stepper = Stepper(setup, emit, state)
        else:
            self.stepper = DistStepper(setup, emit, state, self.skips)
        self.transform = None

    def run(self) -> None:
        """The epochs from state.start_epoch on, each followed by validation and a
        checkpoint, until --epochs or early stopping (--patience)."""
        s, o, st = self.setup, self.setup.options, self.state
        if s.mode == "images":  # only epochs over images augment them
            # torchvision + timm build the training transform: images mode needs them
            from tlearn.runtime.augment import train_transform

            self.transform = train_transform(s.network.data_config, s.augment)
        since_best = 0
        if st.best is not None and st.history:
            since_best = st.history[-1]["epoch"] - st.best["epoch"]
        for epoch in range(st.start_epoch, o.epochs):
            if st.stopped_early:
                break
            row = self.train_epoch(epoch)
            v = validate(s, self.caches)
            row["val_loss"], row["val_acc"] = (v[0], v[1]) if v else (None, None)
            st.history.append(row)
            improved = self._keep_if_best(row, v)
            since_best = 0 if improved else since_best + 1
            if (
                o.patience is not None
                and v is not None
                and epoch >= o.freeze_epochs
                and since_best >= o.patience
                and epoch + 1 < o.epochs
            ):
                st.stopped_early = True
            write_once(s.dist, lambda e=epoch: save(s, st, e + 1))
            self.emit(
                "epoch_end",
                {**row, "best": improved and v is not None, "stopped_early": st.stopped_early},
            )

    def _keep_if_best(self, row: dict, v: Validation | None) -> bool:
        """Keep this epoch's weights if its validation is the best so far (higher
        accuracy, then lower loss); without validation the last epoch is kept."""
        best = self.state.best
        improved = (
            v is None
            or best is None
            or v[1] > best["val_acc"]
            or (v[1] == best["val_acc"] and v[0] < best["val_loss"])
        )
        if improved:
            self.state.best = {
                "epoch": row["epoch"],
                "val_acc": row["val_acc"],
                "val_loss": row["val_loss"],
            }
            self.state.best_weights = mutable_state(self.setup)
        return improved

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (0-based); returns its history row without validation."""
        s, o = self.setup, self.setup.options
        head_only = epoch < o.freeze_epochs
        apply_freeze(s.net, s.plan, head_only=head_only)
        set_train_mode(s.net, o.bn)
        # The epoch's order is the same on every rank; augmentation and dropout draw per rank.
        g, g_local = seed_epoch(s.settings.seed, epoch, s.dist)
        batches = epoch_batches(s, self.caches, self.transform, g, g_local, self.skips)
        t0 = time.perf_counter()
        self.emit(
            "epoch_start", {"epoch": epoch + 1, "epochs": o.epochs, "total": len(s.train_set)}
        )
        sums = self.stepper.run(batches, epoch, t0)
        # Keep the step count exact even when images were skipped.
        self.state.step = (epoch + 1) * s.schedule.steps_per_epoch
        dt = time.perf_counter() - t0
        return {
            "epoch": epoch + 1,
            "lr": sums.lr,
            "train_loss": sums.loss / max(sums.seen, 1),
            "train_acc": sums.correct / max(sums.seen, 1),
            "seconds": dt,
            "images_per_s": sums.seen / dt if dt > 0 else 0.0,
        }
