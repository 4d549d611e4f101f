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
from tlearn.jobs.sources import FeatureSource, drop_empty_classes, val_from_images
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
    compare_svm: bool = False,
) -> NNFitResult | None:
    """Train a neural head into `out_dir` (see train.fit_nn); `layers="auto"` searches
    the cut first (module docstring) and records the search in config.json ("layer_auto")
    and sweep.json. `compare_svm`: afterwards keep a linear SVM on the frozen features at
    the same cut instead, when it scores higher on the validation images
    (jobs.compare_svm)."""
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
    auto = is_auto_layer(layers)
    if not auto and not compare_svm:
        return fit_nn(data, out_dir, layers=layers, **kwargs)
    if dist_env() is not None:
        what = "--layer auto" if auto else "--compare-svm"
        raise UsageError(
            f"{what} with a neural head runs in one process, not under torchrun; run "
            "`tlearn fit DATA --layer auto -o probe` once (its config.json names the cut), "
            "then torchrun with --layer NAME and without --compare-svm"
        )
    run = run or RunOptions()
    out_dir = check_output_parent(out_dir)
    check_device(run.device)
    # every check that needs no network, before the search spends its pass over the images
    preflight(
        options or TrainOptions(),
        data,
        model=model,
        layers=None if auto else layers,
        val=val,
        val_split=val_split,
        labels_csv=labels_csv,
        seed=seed,
    )
    cut = dict(model=model, weights=weights, layers=layers, pool=pool)
    split = dict(val=val, val_split=val_split, labels_csv=labels_csv, seed=seed)
    probe = probe_features(data, out_dir, cut, split, force, run, with_val=compare_svm)
    if auto:
        layers = list(probe.sweep.chosen.layers)
        kwargs["layer_auto"] = search_record(probe.sweep)
    fitted = None
    if compare_svm:
        # only the SVM's part needs scikit-learn's estimators: only now
        from tlearn.jobs.compare_svm import fit_svm, keep_svm

        fitted = fit_svm(probe, seed=seed, run=run)
        kwargs["compared"] = fitted.score()
    res = fit_nn(data, out_dir, layers=layers, **kwargs)
    if fitted is not None and res is not None:
        res = keep_svm(res, probe, fitted, out_dir, seed=seed, preset=preset)
    return res


def probe_features(
    data, out_dir: Path, cut: dict, split: dict, force: bool, run: RunOptions, *, with_val: bool
):
    """Frozen features of the run's training images (the same split fit_nn will make:
    `split` holds val, val_split, labels_csv and seed) at the cut (`cut`: model, weights,
    layers, pool), or at every candidate layer for --layer auto, which is then searched
    (the sweep sees the training images only); with_val: the validation images' too."""
    # the features load the backbone (torch), and the run-directory check reads a
    # checkpoint's files with torch's helpers: only now
    from tlearn.jobs.compare_svm import ProbeFeatures
    from tlearn.jobs.layer_auto import AutoLayerSource
    from tlearn.train.checkpoint import check_new_run

    check_new_run(out_dir, force)  # before the long search, not after it
    train_images, val_images = load_datasets(data, **split)
    if with_val and val_images is None:
        raise UsageError(
            "--compare-svm compares on validation images: give --val DIR or --val-split, or "
            "put them in DATA/val"
        )
    model, weights, layers, pool = (cut[k] for k in ("model", "weights", "layers", "pool"))
    seed = split["seed"]
    auto = is_auto_layer(layers)
    if auto:
        source = AutoLayerSource(model, weights, pool, run, seed, head="svm", C=None)
    else:
        source = FeatureSource(model, weights, layers, pool, run, seed)
    stage = "extract train (cut search)" if auto else "extract train (for the SVM)"
    train = source.from_images(train_images, train_images.classes, stage)
    require_some_read(len(train.paths), train.skipped, split["labels_csv"] or data)
    train = drop_empty_classes(train)
    if len(train.classes) < 2:
        raise DataError(
            f"the frozen features need at least two classes with usable training images; "
            f"found {len(train.classes)} ({', '.join(train.classes) or 'none'})"
        )
    valid = val_from_images(source, val_images, train.classes) if with_val else None
    sweep = None
    if auto:
        train, valid, sweep = source.choose(train, valid)
        run.tell(f"--layer auto: {','.join(sweep.chosen.layers)}, {sweep.choice}")
    return ProbeFeatures(train=train, valid=valid, source=source, sweep=sweep)


def search_record(result) -> dict:
    """What Settings.layer_auto keeps (and a checkpoint saves for --resume): the summary
    for config.json and the table for sweep.json."""
    summary = result.summary()
    summary["probe"] = "linear SVM on frozen features, C by cross-validation"
    return {"summary": summary, "table": result.to_dict()}
