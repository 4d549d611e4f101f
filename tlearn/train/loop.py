"""The epochs of a run: each one reseeded from the run's seed, freezing per phase, the
batches of the mode through the steps (one process, or torchrun's), validation, the best
epoch kept, early stopping, and a checkpoint at its end."""

from __future__ import annotations

import time

from tlearn.core import deadline as clock
from tlearn.train.batches import SkipLog, epoch_batches
from tlearn.train.build import Setup
from tlearn.train.checkpoint import TrainState, mutable_state, save
from tlearn.train.ddp import DistStepper
from tlearn.train.dist import write_once
from tlearn.train.frozen import Caches
from tlearn.train.optim import apply_freeze, set_train_mode
from tlearn.train.options import Events
from tlearn.train.schedule import Schedule, seed_epoch
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
        self.estimate = Estimate(setup, state, emit)
        if setup.dist is None:
            self.stepper = Stepper(setup, self.estimate.watch, state)
        else:
            self.stepper = DistStepper(setup, self.estimate.watch, state, self.skips)
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
            # o.epochs may shrink during the first epoch (Estimate.shorten)
            if st.stopped_early or st.time_limited or epoch >= o.epochs:
                break
            started = clock.now()
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
            if not st.stopped_early and epoch + 1 < o.epochs:
                st.time_limited = self._out_of_time(clock.now() - started)
            self.emit(
                "epoch_end",
                {
                    **row,
                    "best": improved and v is not None,
                    "stopped_early": st.stopped_early,
                    "time_limited": st.time_limited,
                    "best_epoch": st.best["epoch"] if st.best else None,
                },
            )

    def _out_of_time(self, epoch_seconds: float) -> bool:
        """--time-limit: another epoch as long as this one would end after the limit.
        Under torchrun rank 0's clock decides for every rank."""
        deadline = self.setup.run.deadline
        if deadline is None:
            return False
        stop = deadline.left() < epoch_seconds
        if self.setup.dist is not None:
            stop = bool(self.setup.dist.gather(stop)[0])
        return stop

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


ESTIMATE_AFTER = 4  # batches measured (after the first, which warms up) for the estimate


class Estimate:
    """Watches the batch events of the first epoch this process trains and, after
    ESTIMATE_AFTER batches past the first, emits an "estimate" event: the measured
    training rate multiplied out over the remaining epochs (validation counted at the
    same rate, an upper bound), and how many epochs --time-limit leaves room for.

    When the limit leaves room for fewer epochs than asked, a new run (not a resumed
    one) is shortened to those epochs: the learning-rate schedule is planned again for
    them (the epoch under way is still warming up), so the rate anneals before the limit
    instead of the run being cut at a high rate.

    With --freeze-epochs the head-only epochs run at another rate than the rest (no
    gradient through the backbone; measured on 2 cores the difference is small either
    way): their rate is told for those epochs alone, and the estimate that can shorten
    the run is measured again in the first epoch that trains the backbone."""

    def __init__(self, setup: Setup, state: TrainState, emit: Events):
        self.setup, self.state, self.emit = setup, state, emit
        self.first: tuple[float, int, int] | None = None  # (time, images, epoch) at batch 1
        self.batches = 0
        self.done = False
        self.head_only_told = False

    def watch(self, name: str, data: dict) -> None:
        self.emit(name, data)
        if name != "batch" or self.done:
            return
        head_only = data["epoch"] <= self.setup.options.freeze_epochs
        if head_only and self.head_only_told:
            return
        t = clock.now()
        if self.first is None or self.first[2] != data["epoch"]:  # measure within an epoch
            self.first, self.batches = (t, data["done"], data["epoch"]), 1
            return
        self.batches += 1
        dt, images = t - self.first[0], data["done"] - self.first[1]
        if self.batches <= ESTIMATE_AFTER or dt <= 0 or images <= 0:
            return
        info = self.measure(images / dt, data["epoch"], self.batches - 1, head_only)
        if head_only:
            self.head_only_told = True
        else:
            self.done = True
            self.shorten(info, data["epoch"])
        self.emit("estimate", info)

    def measure(self, rate: float, epoch: int, batches: int, head_only: bool = False) -> dict:
        s = self.setup
        n_val = len(s.val_set) if s.val_set else 0
        per_epoch = (len(s.train_set) + n_val) / rate
        last = s.options.freeze_epochs if head_only else s.options.epochs
        epochs_left = last - epoch + 1
        out = {
            "images_per_s": rate,
            "batches": batches,
            "epoch_seconds": per_epoch,
            "epochs": epochs_left,
            "total_seconds": per_epoch * epochs_left,
            "epochs_in_limit": None,
            "limit_seconds": None,
            "shortened_to": None,
            "phase": "head only" if head_only else None,
        }
        if s.run.deadline is not None and not head_only:
            # the current epoch, under way, counts whole; the first always runs
            fit = int(s.run.deadline.left() // per_epoch) if per_epoch > 0 else epochs_left
            out["epochs_in_limit"] = min(epochs_left, max(1, fit))
            out["limit_seconds"] = s.run.deadline.seconds
        return out

    def shorten(self, info: dict, epoch: int) -> None:
        """`epoch` (1-based) is under way; the run ends after the epochs that fit."""
        s, o = self.setup, self.setup.options
        fit = info["epochs_in_limit"]
        if s.dist is not None:  # every rank estimates at the same batch: rank 0's count rules
            fit = s.dist.gather(fit)[0]
            info["epochs_in_limit"] = fit
        if fit is None or self.state.start_epoch > 0:
            return
        total = epoch - 1 + fit
        if total >= o.epochs:
            return
        self.state.epochs_planned = o.epochs
        o.epochs = total
        s.settings.options["epochs"] = total  # what the checkpoint (and --resume) will see
        s.schedule = Schedule.plan(
            len(s.train_set),
            s.batch_size,
            epochs=total,
            freeze_epochs=o.freeze_epochs,
            warmup=min(o.warmup_epochs, total - o.freeze_epochs),
        )
        info["shortened_to"] = total
