"""The entry points: fit_nn trains a new run, resume_nn continues an interrupted one; both
in this process, or as one rank of a torchrun process group."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import ArtifactError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL
from tlearn.core.system import dist_env
from tlearn.scale.group import ProcessGroup
from tlearn.train.build import Setup, build
from tlearn.train.checkpoint import (
    CHECKPOINT_DIR,
    TrainState,
    has_checkpoint,
    read_state,
    restore,
)
from tlearn.train.dist import Dist, check_one_gpu_per_process
from tlearn.train.finish import finish
from tlearn.train.frozen import Caches
from tlearn.train.loop import Trainer
from tlearn.train.options import Events, NNFitResult, Settings, TrainOptions, check_options

Prepare = Callable[[RunOptions, Dist | None], tuple[Setup, TrainState]]


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
    t0 = time.perf_counter()
    options = options or TrainOptions()
    check_options(options)
    run = run or RunOptions()
    out_dir = check_output_parent(out_dir)
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

    def prepare(run: RunOptions, dist: Dist | None) -> tuple[Setup, TrainState]:
        if out_dir.exists() and not force:
            if has_checkpoint(out_dir):
                raise ArtifactError(
                    f"{out_dir} holds an unfinished training run; continue it with --resume "
                    f"{out_dir}, or pass --force to start over"
                )
            raise ArtifactError(f"{out_dir} already exists; choose another -o or pass --force")
        return build(settings, out_dir, run, dist), TrainState()

    def start_over() -> None:
        if force and out_dir.exists() and has_checkpoint(out_dir):
            shutil.rmtree(out_dir / CHECKPOINT_DIR)

    return _start(prepare, start_over, run, events, t0)


def _check_unchanged(saved: Settings, changed: dict) -> None:
    """--resume continues the same run: options given again must equal the saved ones."""
    for key, value in changed.items():
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
    t0 = time.perf_counter()
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
        if data is not None and _abs(data) != saved.data:
            raise UsageError(
                f"--resume: the run was trained on {saved.data}, not {_abs(data)}; give the "
                "same data or start a new run"
            )
        _check_unchanged(saved, changed or {})
        run = dataclasses.replace(run, batch_size=saved.batch_size)
        setup = build(saved, model_dir, run, dist)
        return setup, restore(setup, state)

    return _start(prepare, None, run or RunOptions(), events, t0)


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


def _abs(p) -> str | None:
    return None if p is None else os.path.abspath(os.fspath(p))
