"""Command line: parse options, call one library function, render the result.

Results go to stdout, messages and progress to stderr. Exit codes: 0 success,
1 error (bad input, missing file, unloadable model), 2 usage error, 3 unreadable
images under --strict, 130 interrupted.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tlearn import cli_train as ct
from tlearn.core.errors import TlearnError, UsageError
from tlearn.core.version import __version__

app = typer.Typer(
    name="tlearn",
    help="Transfer learning on image folders: cut a pretrained backbone at any layer, "
    "fit a linear SVM or logistic regression on its features, predict and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Wide when piped, so tables in logs are not folded into 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True, soft_wrap=True)  # one message, one line: greppable logs
DEBUG = {"on": False}


def _version(value: bool):
    if value:
        typer.echo(f"tlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show version and exit."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
):
    DEBUG["on"] = debug
    from tlearn.core.system import is_secondary_rank
    from tlearn.scale.group import check_torchrun_command

    if is_secondary_rank():  # under torchrun only rank 0 prints
        out.quiet = err.quiet = True
    handle_errors(check_torchrun_command)(ctx.invoked_subcommand)


def _error_console(e: BaseException) -> tuple[Console, str]:
    """Where an error goes: stderr; under torchrun ranks other than 0 are silent, except
    for an error that happened on that rank alone (see shard.ProcessGroup)."""
    rank = getattr(e, "rank_only", None)
    if rank is not None and rank != 0 and err.quiet:
        return Console(stderr=True, soft_wrap=True), f"[red]error (rank {rank}):[/]"
    return err, "[red]error:[/]"


def handle_errors(fn):
    """One line on stderr and a non-zero exit for anything the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TlearnError as e:
            if DEBUG["on"]:
                raise
            console, label = _error_console(e)
            console.print(f"{label} {escape(str(e))}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # a bug or an environment problem: still one line
            if DEBUG["on"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            console, label = _error_console(e)
            console.print(
                f"{label} unexpected {type(e).__name__}: {escape(first)} "
                "(rerun with tlearn --debug ... for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper


# ----------------------------------------------------------------------------- options

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="timm architecture name (see `tlearn models`).")
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights",
        help="auto (bundled offline package, else timm's pretrained weights), none (random "
        "init), or a .safetensors/.pth file.",
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        "-l",
        help="Where to cut: a name from `tlearn layers MODEL` (e.g. blocks.4), a feature stage "
        "index like -1, or several joined by commas. Default: the final pooled features. "
        "fit also takes auto: sweep the layers on the training data (CV) and pick the best.",
    ),
]


class Pool(str, Enum):
    avg = "avg"
    max = "max"
    avgmax = "avgmax"
    catavgmax = "catavgmax"
    flatten = "flatten"


class Head(str, Enum):
    svm = "svm"
    logreg = "logreg"
    linear = "linear"
    mlp = "mlp"


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


PoolOpt = Annotated[
    Pool, typer.Option("--pool", help="How to turn the cut feature map into a vector.")
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=0, help="Decoding processes (default: auto).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Fail (exit 3) if any image cannot be read; nothing is written."),
]
LabelsOpt = Annotated[
    Path | None, typer.Option("--labels", help="CSV with header path,label instead of folders.")
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Do only shard I of N (0-based) and write OUTPUT.part-I-of-N (5 digits each); "
        "join the parts with `tlearn merge`. Under torchrun the ranks shard and merge by "
        "themselves.",
    ),
]


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


BackendOpt = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="Inference backend: auto (ONNX Runtime on CPU, torch on GPU), torch or onnx.",
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Neither read nor write the feature cache (see `tlearn cache info`).",
    ),
]


def _run_options(
    batch_size, device, workers, quiet, progress=None, backend=Backend.auto, no_cache=False
):
    from tlearn.core.options import RunOptions

    return RunOptions(
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress,
        backend=Backend(backend).value,
        cache=not no_cache,
    )


def _Bars(quiet: bool):
    """Progress bars on stderr, only when it is a terminal and not --quiet."""
    from tlearn.cli_bars import Bars

    return Bars(err, enabled=not quiet and err.is_terminal and not err.quiet)


def _report_skips(skipped, warnings, quiet: bool) -> None:
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    if skipped:
        if not quiet:
            for s in skipped[:20]:
                err.print(
                    f"[yellow]skipped[/] {escape(s.path)}: {escape(s.reason)}", highlight=False
                )
            if len(skipped) > 20:
                err.print(f"... and {len(skipped) - 20} more", highlight=False)
        err.print(f"[yellow]{len(skipped)} image(s) skipped[/]", highlight=False)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.3f}"


# ----------------------------------------------------------------------------- models / layers


@app.command("models")
@handle_errors
def models_cmd(
    pattern: Annotated[str | None, typer.Argument(help="Filter, e.g. 'resnet*' or 'lite'.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Only models usable offline.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """List timm architectures, marking those whose weights are available offline now.

    Example: tlearn models lite
    """
    from tlearn.backbone.models import list_models

    rows = list_models(pattern)
    if offline:
        rows = [r for r in rows if r.offline]
    if as_json:
        typer.echo(
            json.dumps([{"name": r.name, "offline": r.offline, "bundled": r.bundled} for r in rows])
        )
        return
    for r in rows:
        mark = "offline (bundled)" if r.bundled else ("offline (cached)" if r.offline else "")
        typer.echo(f"{r.name}\t{mark}".rstrip())
    err.print(
        f"{len(rows)} model(s); {sum(r.offline for r in rows)} usable offline", highlight=False
    )


@app.command("layers")
@handle_errors
def layers_cmd(
    model: Annotated[str, typer.Argument(help="timm architecture name.")] = "tf_efficientnet_lite0",
    input_size: Annotated[
        int | None,
        typer.Option("--input-size", min=8, help="Input side in pixels (default: the model's)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also draw output shapes and parameters per block to a PNG."),
    ] = None,
):
    """Every place the network can be cut: output shape C x H x W, reduction, cumulative
    parameters and GFLOPs per image. Stages from timm's feature_info are marked.

    Example: tlearn layers tf_efficientnet_lite0 --input-size 224
    """
    import timm

    from tlearn.backbone.layers import list_layers
    from tlearn.backbone.models import create_model, data_config_for, unknown_model_message

    if model not in timm.list_models():
        raise TlearnError(unknown_model_message(model))
    net = create_model(model, pretrained=False)
    size = input_size or data_config_for(net)["input_size"][1]
    layers = list_layers(net, size)
    if plot is not None:
        from tlearn.backbone.layers import overview_layers
        from tlearn.report.plots import plot_layers

        plot_layers(overview_layers(net, layers), plot, f"{model} at {size}x{size}")
        err.print(f"wrote {plot}", highlight=False)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": model,
                    "input_size": size,
                    "layers": [
                        {
                            "name": li.name,
                            "type": li.type,
                            "shape": list(li.shape),
                            "reduction": li.reduction,
                            "params": li.params,
                            "gflops": li.gflops,
                            "stage": li.stage,
                        }
                        for li in layers
                    ],
                }
            )
        )
        return
    table = Table(title=f"{model} at {size}x{size}: where it can be cut")
    for col in (
        "layer",
        "type",
        "output C x H x W",
        "reduction",
        "params so far",
        "GFLOPs",
        "stage",
    ):
        table.add_column(col, justify="right" if col not in ("layer", "type") else "left")
    for li in layers:
        table.add_row(
            li.name,
            li.type,
            " x ".join(map(str, li.shape)),
            f"/{li.reduction}" if li.reduction else "",
            f"{li.params:,}",
            f"{li.gflops:.3f}",
            "" if li.stage is None else f"stage {li.stage}",
        )
    out.print(table)
    err.print(
        "cut with --layer NAME (or a stage index like -1); default: final pooled features",
        highlight=False,
    )


# ----------------------------------------------------------------------------- extract


@app.command("extract")
@handle_errors
def extract_cmd(
    data: Annotated[
        list[Path], typer.Argument(help="Folder of class sub-folders, or images/folders.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="CSV file, or - for stdout.")],
    model: ModelOpt = "tf_efficientnet_lite0",
    weights: WeightsOpt = "auto",
    layer: LayerOpt = None,
    pool: PoolOpt = Pool.avg,
    labels: LabelsOpt = None,
    strict: StrictOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted run: keep rows already in OUTPUT.partial."
        ),
    ] = False,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
):
    """Extract pooled features at the cut and write CSV columns path,label,f0..fN, plus a
    sidecar OUTPUT.json recording the backbone, layer, pool and preprocessing.

    Example: tlearn extract sample_data/roads/train -o features.csv --layer blocks.5
    """
    from tlearn.jobs.distributed import extract
    from tlearn.scale.shard import Shard

    try:
        with _Bars(quiet) as bars:
            res = extract(
                data,
                output,
                model=model,
                weights=weights,
                layers=layer,
                pool=pool.value,
                labels_csv=labels,
                strict=strict,
                resume=resume,
                run=_run_options(batch_size, device, workers, quiet, bars, backend, no_cache),
                shard=None if shard is None else Shard.parse(shard),
            )
    except KeyboardInterrupt:
        from tlearn.features.table import partial_path

        partial = partial_path(output)
        if output != "-" and shard is None and partial.is_file():
            err.print(
                f"the rows written so far are kept in {partial}; to continue, run the same "
                "command with --resume",
                highlight=False,
                soft_wrap=True,
            )
        raise
    if res is None:  # a torchrun rank other than 0: rank 0 merged and reports
        return
    _report_skips(res.skipped, res.warnings, quiet)
    if not quiet:
        dest = "stdout" if output == "-" else res.out
        err.print(
            f"wrote {res.rows} rows x {res.feature_dim} features to {dest} in {res.seconds:.1f}s"
            f"{_engine_note(res.engine)}",
            highlight=False,
        )


def _engine_note(engine: dict) -> str:
    if not engine:
        return ""
    if not engine.get("backend"):
        return f" (all {engine.get('cached', 0)} from the feature cache)"
    return (
        f" ({engine['backend']}; {engine.get('computed', 0)} computed, "
        f"{engine.get('cached', 0)} from the feature cache)"
    )


# ----------------------------------------------------------------------------- fit


def _print_validation(metrics: dict | None, n_val: int) -> None:
    """After a fit: the per-class table and one summary line (nothing without --val)."""
    if metrics:
        out.print(_metrics_table(metrics, f"validation on {n_val} images"))
        out.print(
            f"validation accuracy {metrics['accuracy']:.3f}, balanced "
            f"{metrics['balanced_accuracy']:.3f}",
            highlight=False,
        )


def _metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for cls, m in metrics["per_class"].items():
        table.add_row(
            escape(cls), _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]), str(m["support"])
        )
    return table


def _confusion_table(metrics: dict) -> Table:
    labels = metrics["confusion"]["labels"]
    table = Table(title="confusion (rows: true, columns: predicted)")
    table.add_column("true \\ pred")
    for lab in labels:
        table.add_column(escape(lab), justify="right")
    for lab, row in zip(labels, metrics["confusion"]["matrix"], strict=True):
        table.add_row(escape(lab), *[str(v) for v in row])
    return table


@app.command("fit")
@handle_errors
def fit_cmd(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            help="Folder of class sub-folders (or with train/ and val/), or a features CSV."
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
        Path | None, typer.Option("--val", help="Validation folder (or features CSV).")
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOpt = False,
    hidden: ct.HiddenOpt = None,
    dropout: ct.DropoutOpt = None,
    head_bn: ct.HeadBNOpt = False,
    freeze: ct.FreezeOpt = None,
    freeze_to: ct.FreezeToOpt = None,
    freeze_epochs: ct.FreezeEpochsOpt = 0,
    bn: ct.BNOpt = ct.BN.frozen,
    lr: ct.LROpt = None,
    layer_decay: ct.LayerDecayOpt = None,
    lr_groups: ct.LRGroupsOpt = None,
    optimizer: ct.OptimizerOpt = ct.Optimizer.adamw,
    momentum: ct.MomentumOpt = 0.9,
    weight_decay: ct.WeightDecayOpt = 0.01,
    warmup_epochs: ct.WarmupOpt = 1.0,
    label_smoothing: ct.SmoothingOpt = 0.1,
    class_weight: ct.ClassWeightOpt = None,
    epochs: ct.EpochsOpt = 10,
    patience: ct.PatienceOpt = None,
    augment: ct.AugmentOpt = None,
    cache: ct.CacheOpt = ct.Cache.memory,
    cache_dir: ct.CacheDirOpt = None,
    resume: ct.ResumeOpt = None,
):
    """Fit a linear SVM (or logistic regression) on extracted features, or train a new
    neural head (--head linear|mlp), optionally fine-tuning part of the network.

    Example: tlearn fit sample_data/roads/train --val sample_data/roads/val -o roads-model

    Example: tlearn fit hymenoptera --head linear --freeze-to auto --layer-decay 0.5 -o bees

    Several GPUs (neural heads; --batch-size is the global batch, split over the ranks):
    torchrun --nproc-per-node 4 -m tlearn fit hymenoptera --head linear -o bees
    """
    # The arguments as typer converted them (enums are enums). ctx.params holds click's
    # raw values, which are plain strings under older typer/click releases.
    params = {k: v for k, v in locals().items() if k != "ctx"}
    from tlearn.scale.group import check_torchrun_fit

    if resume is not None or head in (Head.linear, Head.mlp):
        return ct.fit_nn_command(ctx, params, err, out)
    check_torchrun_fit(head.value)
    ct.check_not_nn(ctx)
    if output is None:
        raise UsageError("missing -o/--output: the model directory to create")
    from tlearn.jobs.fit import fit

    with _Bars(quiet) as bars:
        res = fit(
            data,
            output,
            head=head.value,
            C=C,
            val=val,
            val_split=val_split,
            seed=seed,
            model=model,
            weights=weights,
            layers=layer,
            pool=pool.value,
            labels_csv=labels,
            force=force,
            strict=strict,
            run=_run_options(batch_size, device, workers, quiet, bars, backend, no_cache),
        )
    _report_skips(res.skipped, res.warnings, quiet)
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
                }
            )
        )
        return
    if res.sweep is not None and not quiet:
        wide = err if err.is_terminal else Console(stderr=True, width=200)  # logs: no folding
        wide.print(_sweep_table(res.sweep, "--layer auto: CV accuracy per cut on training data"))
        err.print(f"{res.sweep.method}; table saved as sweep.json", highlight=False)
    if res.head.cv_results_ and not quiet:
        t = Table(title=f"C chosen by {res.head.folds}-fold cross-validation")
        for col in ("C", "CV accuracy", "std", "seconds"):
            t.add_column(col, justify="right")
        for r in res.head.cv_results_:
            mark = " *" if r.C == res.head.C_ else ""
            t.add_row(f"{r.C:g}{mark}", f"{r.mean:.3f}", f"{r.std:.3f}", f"{r.fit_seconds:.1f}")
        err.print(t)
    layers = ",".join(res.cut.layers)
    out.print(
        f"fitted {res.head.kind} (C={res.head.C_:g}) on {res.n_train} images, {len(res.classes)} "
        f"classes, {res.feature_dim} features from {res.cut.model} at {layers} "
        f"({res.cut.pool}) in {res.seconds:.1f}s -> {res.out_dir}",
        highlight=False,
    )
    _print_validation(res.val_metrics, res.n_val)


# ----------------------------------------------------------------------------- predict


@app.command("predict")
@handle_errors
def predict_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from tlearn fit.")],
    paths: Annotated[list[Path], typer.Argument(help="Images and/or folders (or a features CSV).")],
    fmt: Annotated[
        Format | None,
        typer.Option("--format", "-f", help="table on a terminal, csv when piped (default)."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="Show the K best classes.")
    ] = 1,
    all_scores: Annotated[
        bool, typer.Option("--all-scores", help="Add every class's score.")
    ] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
    strict: StrictOpt = False,
    tta: ct.TTAOpt = ct.TTA.none,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
):
    """Predict the class of each image: path, predicted class, score.

    Example: tlearn predict roads-model photo1.jpg more_photos/ --format jsonl
    """
    from tlearn.core.errors import UsageError
    from tlearn.jobs.distributed import predict
    from tlearn.scale.shard import Shard

    part = None if shard is None else Shard.parse(shard)
    if part is not None and (output is None or fmt == Format.table):
        raise UsageError("--shard writes a part file: add -o FILE, with --format csv/json/jsonl")
    with _Bars(quiet) as bars:
        res = predict(
            model_dir,
            paths,
            strict=strict,
            tta=tta.value,
            run=_run_options(batch_size, device, workers, quiet, bars, backend, no_cache),
            shard=part,
        )
    if res is None:  # a torchrun rank other than 0: rank 0 writes the predictions
        return
    _report_skips(res.skipped, res.warnings, quiet)
    if fmt is None:
        fmt = Format.table if (output is None and out.is_terminal) else Format.csv
    k = min(top_k, len(res.classes))
    records = []
    for p in res.predictions:
        ranked = sorted(p.scores.items(), key=lambda kv: -kv[1])[:k]
        rec = {"path": p.path, "prediction": p.label, "score": p.score}
        if k > 1:
            rec["top_k"] = [{"class": c, "score": s} for c, s in ranked]
        if all_scores:
            rec["scores"] = p.scores
        records.append(rec)
    text = _render_predictions(records, fmt, res.classes, k, all_scores, res.score_kind)
    if output is not None and res.part is not None:
        from tlearn.scale.shard import write_predictions_part

        written = write_predictions_part(
            output,
            text,
            res.part,
            rows=len(records),
            output_format=fmt.value,
            model_dir=model_dir,
            options={"top_k": k, "all_scores": all_scores},
        )
        if not quiet:
            err.print(f"wrote {len(records)} predictions to {written}", highlight=False)
    elif output is not None:
        from tlearn.core.atomic import atomic_file
        from tlearn.data.skipped import SKIPPED_CSV, write_skipped_csv

        with atomic_file(output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        write_skipped_csv(output.parent / SKIPPED_CSV, res.skipped)
        if not quiet:
            err.print(f"wrote {len(records)} predictions to {output}", highlight=False)
    else:
        sys.stdout.write(text)


def _render_predictions(records, fmt: Format, classes, k, all_scores, score_kind):
    import io

    if fmt == Format.json:
        return json.dumps({"score": score_kind, "predictions": records}, ensure_ascii=False) + "\n"
    if fmt == Format.jsonl:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if fmt == Format.csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        header = ["path", "prediction", "score"]
        for i in range(2, k + 1):
            header += [f"top{i}", f"top{i}_score"]
        if all_scores:
            header += [f"score_{c}" for c in classes]
        w.writerow(header)
        for r in records:
            row = [r["path"], r["prediction"], f"{r['score']:.6g}"]
            for t in r.get("top_k", [])[1:]:
                row += [t["class"], f"{t['score']:.6g}"]
            if all_scores:
                row += [f"{r['scores'][c]:.6g}" for c in classes]
            w.writerow(row)
        return buf.getvalue()
    table = Table(title=f"predictions (score: {score_kind})")
    table.add_column("path", overflow="fold")
    table.add_column("prediction")
    table.add_column("score", justify="right")
    if k > 1:
        table.add_column(f"top {k}")
    for r in records:
        row = [escape(r["path"]), escape(r["prediction"]), f"{r['score']:.3f}"]
        if k > 1:
            row.append(escape(", ".join(f"{t['class']} {t['score']:.3f}" for t in r["top_k"])))
        table.add_row(*row)
    console = Console(file=io.StringIO(), width=out.width, force_terminal=out.is_terminal)
    console.print(table)
    return console.file.getvalue()


# ----------------------------------------------------------------------------- evaluate


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from tlearn fit.")],
    data: Annotated[Path, typer.Argument(help="Folder of class sub-folders, or a features CSV.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write metrics.json, confusion.csv, confusion.png and worst.png here.",
        ),
    ] = None,
    labels: LabelsOpt = None,
    strict: StrictOpt = False,
    tta: ct.TTAOpt = ct.TTA.none,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
):
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and the confusion matrix.

    Example: tlearn evaluate roads-model sample_data/roads/val --json
    """
    from tlearn.jobs.evaluate import evaluate
    from tlearn.report.metrics import write_reports

    with _Bars(quiet) as bars:
        res = evaluate(
            model_dir,
            data,
            labels_csv=labels,
            strict=strict,
            tta=tta.value,
            run=_run_options(batch_size, device, workers, quiet, bars, backend, no_cache),
        )
    _report_skips(res.skipped, res.warnings, quiet)
    m = res.metrics
    if output is not None:
        written = write_reports(output, m, res.skipped)
        from tlearn.report.plots import write_evaluation_plots

        written += write_evaluation_plots(output, res)
        if not quiet:
            err.print(f"wrote {', '.join(map(str, written))}", highlight=False)
    if as_json:
        typer.echo(json.dumps(m))
        return
    out.print(_metrics_table(m, f"{m['n_images']} images"))
    out.print(_confusion_table(m))
    out.print(
        f"accuracy {_pct(m['accuracy'])}, balanced accuracy {_pct(m['balanced_accuracy'])}",
        highlight=False,
    )


# ----------------------------------------------------------------------------- sweep


def _sweep_table(res, title: str) -> Table:
    table = Table(title=title)
    for col in ("layer", "dim", "output C x H x W", "GFLOPs", "CV accuracy", "C", "fit s"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in res.rows:
        mark = " *" if r.layers == res.best.layers else ""
        table.add_row(
            f"{r.name}{mark}",
            str(r.feature_dim),
            " x ".join(map(str, r.shape)) if r.shape else "",
            f"{r.gflops:.3f}",
            f"{r.cv_mean:.3f} +- {r.cv_std:.3f}",
            f"{r.C:g}",
            f"{r.fit_seconds:.2f}",
        )
    for r in res.pairs:
        table.add_row(
            f"{r.name}{' (best pair)' if r is res.best_pair else ''}",
            str(r.feature_dim),
            "pair",
            f"{r.gflops:.3f}",
            f"{r.cv_mean:.3f} +- {r.cv_std:.3f}",
            f"{r.C:g}",
            f"{r.fit_seconds:.2f}",
        )
    return table


def _sweep_summary(res) -> list[str]:
    b = res.best
    lines = [
        f"recommended cut: --layer {b.name} (CV accuracy {b.cv_mean:.3f} +- {b.cv_std:.3f}, "
        f"{b.feature_dim} features, {b.gflops:.3f} GFLOPs)"
    ]
    p = res.best_pair
    if p is not None:
        gain = p.cv_mean - b.cv_mean
        lines.append(
            f"best pair: --layer {p.name} (CV accuracy {p.cv_mean:.3f} +- {p.cv_std:.3f}, "
            f"{gain:+.3f} vs the recommended single layer, {p.feature_dim} features)"
        )
    return lines


@app.command("sweep")
@handle_errors
def sweep_cmd(
    data: Annotated[
        Path,
        typer.Argument(help="Folder of class sub-folders (only its train/ part if it has one)."),
    ],
    model: ModelOpt = "tf_efficientnet_lite0",
    weights: WeightsOpt = "auto",
    layers: Annotated[
        str,
        typer.Option(
            "--layers",
            "--layer",
            "-l",
            help="stages (timm's feature stages + final), all (also every block in between), "
            "or NAME,NAME,... from `tlearn layers MODEL`.",
        ),
    ] = "stages",
    pool: PoolOpt = Pool.avg,
    head: Annotated[Head, typer.Option("--head", help="Linear head to score each cut.")] = Head.svm,
    C: Annotated[
        str, typer.Option("--C", help="auto (searched per cut by CV) or a number like 0.01.")
    ] = "auto",
    folds: Annotated[int, typer.Option("--folds", min=2, help="Cross-validation folds.")] = 5,
    pairs: Annotated[
        bool, typer.Option("--pairs/--no-pairs", help="Also score pairs of the best layers.")
    ] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed for folds and solvers.")] = 0,
    labels: LabelsOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write sweep.json + sweep.png here.")
    ] = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sweep as JSON.")] = False,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
):
    """Where to cut: one forward pass per image collects pooled features at every candidate
    layer, then a cross-validated linear head scores each layer (and pairs of the best).
    Uses the training images only; recommends the most accurate cut (ties: the cheaper).

    Example: tlearn sweep sample_data/roads/train --layers all -o sweep-roads
    """
    from tlearn.jobs.sweep import sweep, write_sweep

    with _Bars(quiet) as bars:
        res = sweep(
            data,
            model=model,
            weights=weights,
            layers=layers,
            pool=pool.value,
            head=head.value,
            C=C,
            folds=folds,
            seed=seed,
            pairs=pairs,
            labels_csv=labels,
            run=_run_options(batch_size, device, workers, quiet, bars, backend, no_cache),
        )
    _report_skips(res.skipped, res.warnings, quiet)
    if output is not None:
        written = write_sweep(res, output)
        if not quiet:
            err.print(f"wrote {', '.join(map(str, written))}", highlight=False)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
        return
    title = f"{res.model}: CV accuracy per cut on {res.n_images} images (* = recommended)"
    out.print(_sweep_table(res, title))
    for line in _sweep_summary(res):
        out.print(line, highlight=False)
    if not quiet:
        err.print(
            f"{res.method}; features in {res.extract_seconds:.1f}s, total {res.seconds:.1f}s",
            highlight=False,
        )


# ----------------------------------------------------------------------------- heatmap


@app.command("heatmap")
@handle_errors
def heatmap_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from tlearn fit.")],
    paths: Annotated[list[Path], typer.Argument(help="Images and/or folders.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs.")],
    class_name: Annotated[
        str | None,
        typer.Option("--class", help="Show this class's map (default: the predicted class)."),
    ] = None,
    alpha: Annotated[
        float, typer.Option("--alpha", min=0.0, max=1.0, help="Opacity of the overlay.")
    ] = 0.5,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    quiet: QuietOpt = False,
):
    """Class heatmaps: the linear head applied as a 1x1 convolution over the feature map at
    the cut, so each map's mean is exactly the model's score. One overlay PNG per image
    (red: evidence for the class, blue: against). Needs a linear head (svm, logreg) at a
    single layer with avg pooling.

    Example: tlearn heatmap roads-model photo1.jpg photos/ -o heatmaps --class gravel
    """
    from tlearn.jobs.heatmap import heatmaps, write_heatmaps

    with _Bars(quiet) as bars:
        res = heatmaps(
            model_dir,
            paths,
            class_name=class_name,
            run=_run_options(batch_size, device, workers, quiet, bars),
        )
        write_heatmaps(res, output, alpha=alpha)
    _report_skips(res.skipped, res.warnings, quiet)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "layer": res.layer,
                    "map_size": list(res.map_size),
                    "score": res.score_kind,
                    "maps": res.decision_kind,
                    "heatmaps": [it.to_dict(res.classes) for it in res.items],
                }
            )
        )
        return
    h, w = res.map_size
    table = Table(title=f"heatmaps at {res.layer} ({h}x{w} map; score: {res.score_kind})")
    for col in ("path", "prediction", "score", "map of", "png"):
        table.add_column(col, overflow="fold", justify="right" if col == "score" else "left")
    for it in res.items:
        table.add_row(it.path, it.predicted, f"{it.score:.3f}", it.shown, str(it.png))
    out.print(table)
    if not quiet:
        err.print(f"wrote {len(res.items)} PNG(s) to {output}", highlight=False)


# ----------------------------------------------------------------------------- merge


@app.command("merge")
@handle_errors
def merge_cmd(
    parts: Annotated[
        list[Path], typer.Argument(help="Every part OUT.part-I-of-N of one run (any order).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The merged file to write.")],
    quiet: QuietOpt = False,
):
    """Join the parts written by extract/predict --shard I/N into the output a single
    process would have written (and skipped.csv beside it). Refuses a missing, duplicated
    or foreign part.

    Example: tlearn merge features.csv.part-* -o features.csv
    """
    from tlearn.scale.merge import merge_parts

    res = merge_parts(parts, output)
    if not quiet:
        if res.skipped:
            err.print(f"[yellow]{len(res.skipped)} image(s) skipped[/]", highlight=False)
        err.print(
            f"merged {res.parts} {res.kind} parts into {res.out}: {res.rows} rows", highlight=False
        )


# ----------------------------------------------------------------------------- cache

cache_app = typer.Typer(
    help="The feature cache: features of images already seen, and exported ONNX models.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@cache_app.command("info")
@handle_errors
def cache_info_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Where the cache is ($TLEARN_CACHE_DIR, else $XDG_CACHE_HOME/tlearn, else
    ~/.cache/tlearn), and what it holds per backbone/layer/pool.

    Example: tlearn cache info
    """
    from dataclasses import asdict

    from tlearn.cache.admin import cache_info

    info = cache_info()
    if as_json:
        typer.echo(json.dumps(asdict(info)))
        return
    table = Table(title=f"feature cache in {info.root}")
    for col in ("model", "layers", "pool", "images", "dim", "size"):
        table.add_column(col, justify="right" if col in ("images", "dim", "size") else "left")
    for c in info.cuts:
        table.add_row(
            c.model,
            ",".join(c.layers),
            c.pool,
            str(c.images),
            "" if c.dim is None else str(c.dim),
            _size(c.bytes),
        )
    out.print(table)
    out.print(
        f"{sum(c.images for c in info.cuts)} cached feature vectors, {info.onnx_models} exported "
        f"ONNX model(s) ({_size(info.onnx_bytes)}); {_size(info.total_bytes)} in all",
        highlight=False,
    )


@cache_app.command("clear")
@handle_errors
def cache_clear_cmd(quiet: QuietOpt = False):
    """Delete cached features, exported ONNX models and resolved cuts (rebuilt when needed).

    Example: tlearn cache clear
    """
    from tlearn.cache.admin import clear_cache
    from tlearn.cache.store import cache_root

    freed = clear_cache()
    if not quiet:
        err.print(f"cleared {cache_root()} ({_size(freed)} freed)", highlight=False)


def main() -> None:
    from tlearn.core.system import dist_env

    if dist_env() is None:
        app()
        return
    # Under torchrun: leave without the interpreter's teardown (see shard.exit_rank).
    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code
    from tlearn.scale.group import exit_rank

    exit_rank(code)


if __name__ == "__main__":
    main()
