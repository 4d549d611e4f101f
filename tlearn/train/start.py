"""Starting a run: build it (train.build), restore a checkpoint for --resume, then train
it in this process or as one rank of a torchrun process group, with a status exchange
after the setup (a rank's error fails every rank with one message, and all ranks must
see the same images and checkpoint)."""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from tlearn.core.errors import ArtifactError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.system import dist_env
from tlearn.scale.group import ProcessGroup
from tlearn.train.build import Setup, build
from tlearn.train.checkpoint import (
    CHECKPOINT_DIR,
    TrainState,
    check_new_run,
    has_checkpoint,
    read_state,
    restore,
)
from tlearn.train.dist import Dist, check_one_gpu_per_process
from tlearn.train.finish import finish
from tlearn.train.frozen import Caches
from tlearn.train.loop import Trainer
from tlearn.train.options import Events, NNFitResult, Settings, TrainOptions, abs_path

Prepare = Callable[[RunOptions, Dist | None], tuple[Setup, TrainState]]


def start_new(
    settings: Settings,
    out_dir: Path,
    force: bool,
    run: RunOptions,
    events: Events | None,
    t0: float,
) -> NNFitResult | None:
    """Train a new run into `out_dir` (see api.fit_nn)."""

    def prepare(run: RunOptions, dist: Dist | None) -> tuple[Setup, TrainState]:
        check_new_run(out_dir, force)
        return build(settings, out_dir, run, dist), TrainState()

    def start_over() -> None:
        if force and out_dir.exists() and has_checkpoint(out_dir):
            shutil.rmtree(out_dir / CHECKPOINT_DIR)

    return _start(prepare, start_over, run, events, t0)


def start_resume(
    model_dir, data, changed: dict, run: RunOptions, events: Events | None, t0: float
) -> NNFitResult | None:
    """Continue the run in `model_dir` from its checkpoint (see api.resume_nn)."""
    model_dir = Path(model_dir)

    def prepare(run: RunOptions, dist: Dist | None) -> tuple[Setup, TrainState]:
        state = read_state(model_dir)
        try:
            saved = Settings(**state["settings"])
            TrainOptions(**saved.options)
        except (KeyError, TypeError) as e:
            raise ArtifactError(
                f"{model_dir}: checkpoint settings are incomplete or unknown ({e}); start a new run"
            ) from None
        if data is not None and abs_path(data) != saved.data:
            raise UsageError(
                f"--resume: the run was trained on {saved.data}, not {abs_path(data)}; give the "
                "same data or start a new run"
            )
        _check_unchanged(saved, changed)
        # --compare-svm belongs to the job that started the run: --resume finishes the
        # network only (nothing would write the SVM if it won)
        saved.compared = None
        run = dataclasses.replace(run, batch_size=saved.batch_size)
        setup = build(saved, model_dir, run, dist)
        return setup, restore(setup, state)

    return _start(prepare, None, run, events, t0)


def _check_unchanged(saved: Settings, changed: dict) -> None:
    """--resume continues the same run: options given again must equal the saved ones."""
    for key, value in changed.items():
        have = saved.options.get(key, getattr(saved, key, None))
        if key in ("val", "labels_csv", "weights") and value is not None:
            value = abs_path(value) if value not in ("auto", "none") else value
        if isinstance(value, (list, tuple)):
            value = list(value)
        if value != have:
            raise UsageError(
                f"--resume continues the same run: --{key.replace('_', '-')} {value} "
                f"differs from the checkpoint's {'default' if have is None else have}; "
                "drop the option or start a new run"
            )


def _start(
    prepare: Prepare, before_training, run: RunOptions, events: Events | None, t0: float
) -> NNFitResult | None:
    """prepare(run, dist) -> the set-up run and its state, then train it: in this process,
    or under torchrun as one rank of a process group, with a status exchange after the
    setup (a rank's error fails every rank with one message, and all ranks must see the
    same images and checkpoint)."""
    env = dist_env()
    if env is None:
        setup, state = prepare(run, None)
        if before_training is not None:
            before_training()
        return _execute(setup, state, events, t0)

    with ProcessGroup(env) as group:
        dist = Dist(env, group)
        setup, state, own = None, None, None
        try:
            run = group.run_options(run)
            check_one_gpu_per_process(env, run.device)
            setup, state = prepare(run, dist)
        except Exception as e:
            own = e
        agree = None if setup is None else [setup.fingerprint, state.start_epoch, state.step]
        dist.check(own, agree=agree)
        if before_training is not None:
            dist.on_main(before_training)
        return _execute(setup, state, events, t0)


def _execute(
    setup: Setup, state: TrainState, events: Events | None, t0: float
) -> NNFitResult | None:
    emit = events or (lambda name, data: None)
    if setup.dist is not None and not setup.dist.main:  # only rank 0 reports
        emit = lambda name, data: None  # noqa: E731
    emit("groups", setup.describe())
    caches = Caches()
    py_state = random.getstate()
    try:
        # Training reseeds the global generators every epoch (for --resume); put the
        # caller's state back afterwards.
        with torch.random.fork_rng(devices=[]):
            caches.fill(setup)
            Trainer(setup, caches, state, emit).run()
            return finish(setup, caches, state, t0)
    finally:
        random.setstate(py_state)
        caches.cleanup()
