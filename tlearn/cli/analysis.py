"""`tlearn sweep` and `tlearn heatmap`: where to cut, and where the model looks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
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
    ModelOpt,
    MultiLabelOpt,
    NoCacheOpt,
    Pool,
    PoolOpt,
    QuietOpt,
    WeightsOpt,
    WorkersOpt,
    run_options,
)
from tlearn.cli.render import err, out, progress_bars, report_skips, sweep_summary, sweep_table
from tlearn.core.atomic import check_output_parent


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
    decode: DecodeOpt = Decode.auto,
    quiet: QuietOpt = False,
    multi_label: MultiLabelOpt = False,
):
    """Where to cut: one forward pass per image collects pooled features at every candidate
    layer, then a cross-validated linear head scores each layer (and pairs of the best).
    Uses the training images only; recommends the most accurate cut (ties: the cheaper).

    Example: tlearn sweep sample_data/roads/train --layers all -o sweep-out
    """
    # only the command that runs loads its job (torch for these)
    from tlearn.jobs.sweep import sweep, write_sweep

    if output is not None:
        check_output_parent(output)  # before any work: a missing folder is one line
    with progress_bars(quiet) as bars:
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
            run=run_options(batch_size, device, workers, quiet, bars, backend, no_cache, decode),
            multi_label=multi_label,
        )
    report_skips(res.skipped, res.warnings, quiet)
    if output is not None:
        written = write_sweep(res, output)
        if not quiet:
            err.print(f"wrote {', '.join(map(str, written))}", highlight=False, markup=False)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
        return
    title = (
        f"{escape(res.model)}: CV {res.metric} per cut on {res.n_images} images (* = recommended)"
    )
    out.print(sweep_table(res, title))
    for line in sweep_summary(res):
        out.print(line, highlight=False, markup=False)
    if not quiet:
        err.print(
            f"{res.method}; features in {res.extract_seconds:.1f}s, total {res.seconds:.1f}s",
            highlight=False,
            markup=False,
        )


# ----------------------------------------------------------------------------- heatmap


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

    Example: tlearn heatmap roads-model photo.jpg -o heatmaps --class gravel
    """
    # only the command that runs loads its job (torch for these)
    from tlearn.jobs.heatmap import heatmaps, write_heatmaps

    check_output_parent(output)  # before any work: a missing folder is one line
    with progress_bars(quiet) as bars:
        res = heatmaps(
            model_dir,
            paths,
            class_name=class_name,
            run=run_options(batch_size, device, workers, quiet, bars),
        )
        write_heatmaps(res, output, alpha=alpha)
    report_skips(res.skipped, res.warnings, quiet)
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
    table = Table(title=f"heatmaps at {escape(res.layer)} ({h}x{w} map; score: {res.score_kind})")
    for col in ("path", "prediction", "score", "map of", "png"):
        table.add_column(col, overflow="fold", justify="right" if col == "score" else "left")
    for it in res.items:
        table.add_row(
            escape(it.path),
            escape(it.predicted),
            f"{it.score:.3f}",
            escape(it.shown),
            escape(str(it.png)),
        )
    out.print(table)
    if not quiet:
        err.print(f"wrote {len(res.items)} PNG(s) to {output}", highlight=False, markup=False)
