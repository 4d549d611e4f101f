"""The entry points: fit_nn trains a new run, resume_nn continues an interrupted one; both
in this process, or as one rank of a torchrun process group (train.start). Everything
that can be checked without the network is checked here first, before torch loads: a
typo in an option fails in well under a second."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tlearn.cache.remembered import check_layers
from tlearn.cache.store import cache_root
from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import UsageError
from tlearn.core.options import RunOptions, check_device
from tlearn.core.spec import DEFAULT_MODEL
from tlearn.data.split import check_val_split
from tlearn.train.datasets import load_datasets
from tlearn.train.options import (
    Events,
    NNFitResult,
    Settings,
    TrainOptions,
    abs_path,
    check_options,
)


def preflight(
    options: TrainOptions,
    data,
    *,
    model: str,
    layers,
    val,
    val_split: float | None,
    labels_csv,
    seed: int,
) -> None:
    """The checks that need no network: options, --val-split, --layer and --freeze-to
    names (when the model's cut points are known or remembered), and the image folders."""
    check_options(options)
    if val is not None and val_split is not None:
        raise UsageError("use either --val DIR or --val-split, not both")
    if val_split is not None:
        check_val_split(val_split)
    root = cache_root()
    check_layers(root, model, layers)
    if options.freeze_to not in (None, "auto"):
        check_layers(root, model, [options.freeze_to], "--freeze-to")
    load_datasets(data, val=val, val_split=val_split, labels_csv=labels_csv, seed=seed)


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
    preset: dict | None = None,
    layer_auto: dict | None = None,
    compared: dict | None = None,
) -> NNFitResult | None:
    """Train a new neural head (and optionally part of the backbone) on an image folder and
    write the model directory `out_dir`. A checkpoint in out_dir/checkpoint/ is written at
    the end of every epoch; `resume_nn` continues from it.

    Under torchrun every rank trains its share of each global batch (`run.batch_size` is
    the global batch) and rank 0 writes; ranks other than 0 return None.

    `preset`: the --preset recipe, recorded in config.json; `layer_auto`: the search that
    chose `layers` (jobs.fit_neural), recorded the same way; `compared`: a linear SVM's
    validation score to compare with (jobs.compare_svm). With run.deadline
    (--time-limit) training stops at the end of the last epoch that fits, keeping the best
    epoch so far; an "estimate" event tells the expected time after a few batches."""
    t0 = time.perf_counter()
    options = options or TrainOptions()
    run = run or RunOptions()
    out_dir = check_output_parent(out_dir)
    check_device(run.device)
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    preflight(
        options,
        data,
        model=model,
        layers=layers,
        val=val,
        val_split=val_split,
        labels_csv=labels_csv,
        seed=seed,
    )
    settings = Settings(
        data=abs_path(data),
        val=abs_path(val),
        val_split=val_split,
        labels_csv=abs_path(labels_csv),
        model=model,
        weights=weights if weights in ("auto", "none") else abs_path(weights),
        layers=list(layers) if layers else None,
        pool=pool,
        seed=seed,
        batch_size=run.batch_size,
        options=options.to_dict(),
        preset=preset,
        layer_auto=layer_auto,
        compared=compared,
    )

    # training needs torch (and the backbone's timm, unless only a head trains): only now
    from tlearn.train.start import start_new

    return start_new(settings, out_dir, force, run, events, t0)


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

    # training needs torch: only now
    from tlearn.train.start import start_resume

    return start_resume(model_dir, data, changed or {}, run or RunOptions(), events, t0)
