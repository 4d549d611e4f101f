"""`tlearn fit`: linear heads here; neural heads and --resume go to cli.train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tlearn.cli.errors import handle_errors
from tlearn.cli.options import (
    Backend,
    BackendOpt,
    BatchOpt,
    Decode,
    DecodeOpt,
    DeviceOpt,
    Head,
    LabelsOpt,
    LayerOpt,
    ModelOpt,
    MultiLabelOpt,
    NoCacheOpt,
    Pool,
    PoolOpt,
    QuietOpt,
    StrictOpt,
    WeightsOpt,
    WorkersOpt,
    run_options,
)
from tlearn.cli.presets import (
    PresetOpt,
    TimeLimitOpt,
    apply_preset,
    recipe_lines,
    start_deadline,
)
from tlearn.cli.render import (
    err,
    out,
    posthoc_lines,
    print_validation,
    progress_bars,
    report_skips,
    sweep_table,
)
from tlearn.cli.train import (
    BN,
    AugmentOpt,
    BNOpt,
    Cache,
    CacheDirOpt,
    CacheOpt,
    ChooseTTAOpt,
    ClassWeightOpt,
    CompareSVMOpt,
    DropoutOpt,
    EpochsOpt,
    FreezeEpochsOpt,
    FreezeOpt,
    FreezeToOpt,
    HeadBNOpt,
    HiddenOpt,
    LayerDecayOpt,
    LRGroupsOpt,
    LROpt,
    MomentumOpt,
    Optimizer,
    OptimizerOpt,
    PatienceOpt,
    ResumeOpt,
    SmoothingOpt,
    WarmupOpt,
    WeightDecayOpt,
    check_not_nn,
    fit_nn_command,
)
from tlearn.core.errors import UsageError
from tlearn.scale.group import check_torchrun_fit


@handle_errors
def fit_cmd(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            help="Folder of class sub-folders (or with train/ and val/), or a features table "
            "(.csv, .parquet, .npy)."
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Model directory to create.")
    ] = None,
    head: Annotated[
        Head,
        typer.Option(
            "--head",
            help="svm/logreg: linear model on extracted features; linear/mlp: a new neural "
            "head trained with the (partly) frozen network.",
        ),
    ] = Head.svm,
    C: Annotated[
        str, typer.Option("--C", help="Regularisation: a number, or auto (cross-validated).")
    ] = "auto",
    val: Annotated[
        Path | None, typer.Option("--val", help="Validation folder (or a features table).")
    ] = None,
    val_split: Annotated[
        float | None, typer.Option("--val-split", help="Hold out this fraction for validation.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for splits and solvers.")] = 0,
    model: ModelOpt = "tf_efficientnet_lite0",
    weights: WeightsOpt = "auto",
    layer: LayerOpt = None,
    pool: PoolOpt = Pool.avg,
    labels: LabelsOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing model directory.")
    ] = False,
    strict: StrictOpt = False,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    decode: DecodeOpt = Decode.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOpt = False,
    hidden: HiddenOpt = None,
    dropout: DropoutOpt = None,
    head_bn: HeadBNOpt = False,
    freeze: FreezeOpt = None,
    freeze_to: FreezeToOpt = None,
    freeze_epochs: FreezeEpochsOpt = 0,
    bn: BNOpt = BN.frozen,
    lr: LROpt = None,
    layer_decay: LayerDecayOpt = None,
    lr_groups: LRGroupsOpt = None,
    optimizer: OptimizerOpt = Optimizer.adamw,
    momentum: MomentumOpt = 0.9,
    weight_decay: WeightDecayOpt = 0.01,
    warmup_epochs: WarmupOpt = 1.0,
    label_smoothing: SmoothingOpt = 0.1,
    class_weight: ClassWeightOpt = None,
    epochs: EpochsOpt = 10,
    patience: PatienceOpt = None,
    augment: AugmentOpt = None,
    cache: CacheOpt = Cache.memory,
    cache_dir: CacheDirOpt = None,
    choose_tta: ChooseTTAOpt = False,
    compare_svm: CompareSVMOpt = False,
    resume: ResumeOpt = None,
    multi_label: MultiLabelOpt = False,
    preset: PresetOpt = None,
    time_limit: TimeLimitOpt = None,
):
    """Fit a linear SVM (or logistic regression) on extracted features, or train a new
    neural head (--head linear|mlp), optionally fine-tuning part of the network.

    Example: tlearn fit sample_data/roads -o roads-model

    Example: tlearn fit bees --head linear --freeze-to auto --layer-decay 0.5

    Several GPUs (neural heads; --batch-size is the global batch, split over the ranks):
    torchrun --nproc-per-node 4 -m tlearn fit bees --head linear -o m
    """
    # The arguments as typer converted them (enums are enums). ctx.params holds click's
    # raw values, which are plain strings under older typer/click releases.
    p = {k: v for k, v in locals().items() if k != "ctx"}
    recipe = apply_preset(ctx, p)  # explicit options win over the preset's
    p["deadline"] = start_deadline(p["time_limit"])
    p["preset_config"] = recipe.to_config() if recipe else None
    if recipe is not None and not quiet:
        for line in recipe_lines(recipe):
            err.print(line, highlight=False, soft_wrap=True, markup=False)
    head = p["head"]
    if multi_label and (resume is not None or head in (Head.linear, Head.mlp)):
        raise UsageError(
            f"--multi-label fits one-vs-rest --head svm or logreg; --head {head.value} "
            "(a neural head with sigmoid outputs) is not available for label sets yet"
        )
    if resume is not None or head in (Head.linear, Head.mlp):
        return fit_nn_command(ctx, p, err, out)
    check_torchrun_fit(head.value)
    check_not_nn(ctx)
    if output is None:
        raise UsageError("missing -o/--output: the model directory to create")
    res = fit_linear(p)
    render_linear_fit(res, quiet=quiet, as_json=as_json)


def fit_linear(p: dict):
    """`fit --head svm|logreg`: one call to jobs.fit with fit's (preset-resolved)
    arguments `p`, under progress bars."""
    # only the command that runs loads its job (fast --help)
    from tlearn.jobs.fit import fit

    quiet = p["quiet"]
    with progress_bars(quiet) as bars:
        run = run_options(
            p["batch_size"],
            p["device"],
            p["workers"],
            quiet,
            bars,
            p["backend"],
            p["no_cache"],
            p["decode"],
        )
        run.deadline = p["deadline"]
        run.note = None if quiet else (lambda text: err.print(text, highlight=False, markup=False))
        return fit(
            p["data"],
            p["output"],
            head=p["head"].value,
            C=p["C"],
            val=p["val"],
            val_split=p["val_split"],
            seed=p["seed"],
            model=p["model"],
            weights=p["weights"],
            layers=p["layer"],
            pool=p["pool"].value,
            labels_csv=p["labels"],
            force=p["force"],
            strict=p["strict"],
            run=run,
            multi_label=p["multi_label"],
            preset=p["preset_config"],
        )


def render_linear_fit(res, *, quiet: bool, as_json: bool) -> None:
    """What `fit --head svm|logreg` prints: JSON, or the tables and the summary line."""
    report_skips(res.skipped, res.warnings, quiet)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model_dir": res.out_dir,
                    "classes": res.classes,
                    "n_train": res.n_train,
                    "n_val": res.n_val,
                    "C": res.head.C_,
                    "cv": [r.__dict__ for r in res.head.cv_results_],
                    "validation": res.val_metrics,
                    "skipped": len(res.skipped),
                    "layers": list(res.cut.layers),
                    "layer_auto": res.sweep.summary() if res.sweep else None,
                    "task": res.task,
                    "calibration": res.posthoc.to_config() if res.posthoc else None,
                    "time_limited": res.time_limited,
                }
            )
        )
        return
    if res.sweep is not None and not quiet:
        wide = err if err.is_terminal else Console(stderr=True, width=200)  # logs: no folding
        cv = f"CV {res.sweep.metric}"
        wide.print(sweep_table(res.sweep, f"--layer auto: {cv} per cut on training data"))
        err.print(f"{res.sweep.method}; table saved as sweep.json", highlight=False, markup=False)
        if res.sweep.choice:
            err.print(f"chosen (*): {res.sweep.choice}", highlight=False, markup=False)
    if res.head.cv_results_ and not quiet:
        t = Table(title=f"C chosen by {res.head.folds_}-fold cross-validation")
        score = "CV mAP" if res.task == "multi-label" else "CV accuracy"
        for col in ("C", score, "std", "seconds"):
            t.add_column(col, justify="right")
        for r in res.head.cv_results_:
            mark = " *" if r.C == res.head.C_ else ""
            t.add_row(f"{r.C:g}{mark}", f"{r.mean:.3f}", f"{r.std:.3f}", f"{r.fit_seconds:.1f}")
        err.print(t)
    layers = ",".join(res.cut.layers)
    what = "labels" if res.task == "multi-label" else "classes"
    stop = " (stopped for the time limit: best so far kept)" if res.time_limited else ""
    out.print(
        f"fitted {res.head.kind} (C={res.head.C_:g}) on {res.n_train} images, {len(res.classes)} "
        f"{what}, {res.feature_dim} features from {res.cut.model} at {layers} "
        f"({res.cut.pool}) in {res.seconds:.1f}s{stop} -> {res.out_dir}",
        highlight=False,
        markup=False,
    )
    if not quiet and res.posthoc is not None:
        for line in posthoc_lines(res.posthoc.to_config()):
            err.print(line, highlight=False, markup=False)
    print_validation(res.val_metrics, res.n_val)
