"""`tlearn fit --head linear|mlp`: train a neural head (train.fit_nn). With `--layer auto`
the cut is searched first, the way `fit --layer auto` searches it for a linear SVM: every
candidate layer extracted in one pass over the training images (never the validation
images, which later pick the best epoch and the TTA), scored by cross-validation of a
linear SVM on the frozen features, the best single layer or the best pair when it wins by
more than the CV noise. The network is then cut there and trained.

Why search with a linear probe: it costs one forward pass and a few seconds of SVM fits
per cut, against several fine-tuning runs of every cut; the lecture's transfer-learning
point is that the layer whose frozen features separate the classes best is where a new
head starts best."""

from __future__ import annotations

from pathlib import Path

from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions, check_device
from tlearn.core.spec import DEFAULT_MODEL, is_auto_layer
from tlearn.core.system import dist_env
from tlearn.data.skipped import require_some_read
from tlearn.jobs.sources import drop_empty_classes
from tlearn.train.api import fit_nn, preflight
from tlearn.train.datasets import load_datasets
from tlearn.train.options import Events, NNFitResult, TrainOptions


def fit_neural(
    data,
    out_dir,
    *,
    options: TrainOptions | None = None,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layers=None,
    pool: str = "avg",
    val=None,
    val_split: float | None = None,
    labels_csv=None,
    seed: int = 0,
    force: bool = False,
    run: RunOptions | None = None,
    events: Events | None = None,
    preset: dict | None = None,
) -> NNFitResult | None:
    """Train a neural head into `out_dir` (see train.fit_nn); `layers="auto"` searches
    the cut first (module docstring) and records the search in config.json ("layer_auto")
    and sweep.json."""
    kwargs = dict(
        options=options,
        model=model,
        weights=weights,
        pool=pool,
        val=val,
        val_split=val_split,
        labels_csv=labels_csv,
        seed=seed,
        force=force,
        run=run,
        events=events,
        preset=preset,
    )
    if not is_auto_layer(layers):
        return fit_nn(data, out_dir, layers=layers, **kwargs)
    if dist_env() is not None:
        raise UsageError(
            "--layer auto with a neural head searches the cut in one process, not under "
            "torchrun; run `tlearn fit DATA --layer auto -o probe` once (its config.json "
            "names the cut), then torchrun with --layer NAME"
        )
    run = run or RunOptions()
    options = options or TrainOptions()
    out_dir = check_output_parent(out_dir)
    check_device(run.device)
    # every check that needs no network, before the search spends its pass over the images
    preflight(
        options,
        data,
        model=model,
        layers=None,
        val=val,
        val_split=val_split,
        labels_csv=labels_csv,
        seed=seed,
    )
    search = search_cut(
        data, out_dir, model, weights, pool, val, val_split, labels_csv, seed, force, run
    )
    layers = list(search.chosen.layers)
    return fit_nn(data, out_dir, layers=layers, layer_auto=search_record(search), **kwargs)


def search_cut(
    data, out_dir: Path, model, weights, pool, val, val_split, labels_csv, seed, force, run
):
    """The --layer auto sweep (jobs.layer_auto) on the training images of the run (the
    same split fit_nn will make): a sweep.SweepResult."""
    # the search loads the backbone (torch), and the run-directory check reads a
    # checkpoint's files with torch's helpers: only now
    from tlearn.jobs.layer_auto import AutoLayerSource
    from tlearn.train.checkpoint import check_new_run

    check_new_run(out_dir, force)  # before the long search, not after it
    train_images, _ = load_datasets(
        data, val=val, val_split=val_split, labels_csv=labels_csv, seed=seed
    )
    source = AutoLayerSource(model, weights, pool, run, seed, head="svm", C=None)
    train = source.from_images(train_images, train_images.classes, "extract train (cut search)")
    require_some_read(len(train.paths), train.skipped, labels_csv or data)
    train = drop_empty_classes(train)
    if len(train.classes) < 2:
        raise DataError(
            f"--layer auto needs at least two classes with usable training images; found "
            f"{len(train.classes)} ({', '.join(train.classes) or 'none'})"
        )
    _, _, result = source.choose(train, None)
    run.tell(f"--layer auto: {','.join(result.chosen.layers)}, {result.choice}")
    return result


def search_record(result) -> dict:
    """What Settings.layer_auto keeps (and a checkpoint saves for --resume): the summary
    for config.json and the table for sweep.json."""
    summary = result.summary()
    summary["probe"] = "linear SVM on frozen features, C by cross-validation"
    return {"summary": summary, "table": result.to_dict()}
