"""`tlearn extract` and `tlearn merge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tlearn.cli.errors import handle_errors
from tlearn.cli.options import (
    Backend,
    BackendOpt,
    BatchOpt,
    Decode,
    DecodeOpt,
    DeviceOpt,
    LabelsOpt,
    LayerOpt,
    ModelOpt,
    MultiLabelOpt,
    NoCacheOpt,
    Pool,
    PoolOpt,
    QuietOpt,
    ShardOpt,
    StrictOpt,
    WeightsOpt,
    WorkersOpt,
    run_options,
)
from tlearn.cli.render import engine_note, err, progress_bars, report_skips
from tlearn.core.errors import UsageError
from tlearn.features.table import partial_path
from tlearn.scale.merge import merge_parts
from tlearn.scale.shard import Shard

# ----------------------------------------------------------------------------- extract


@handle_errors
def extract_cmd(
    data: Annotated[
        list[Path], typer.Argument(help="Folder of class sub-folders, or images/folders.")
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="The table: .parquet (or .pq) for Parquet, .npy for NPY, else CSV; - for CSV "
            "on stdout.",
        ),
    ],
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
    decode: DecodeOpt = Decode.auto,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    multi_label: MultiLabelOpt = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print a JSON summary on stdout: rows, start-up and run seconds, images/s, "
            "and the seconds of each stage (decode, forward, output, ...).",
        ),
    ] = False,
):
    """Extract pooled features at the cut and write a table with columns path, label,
    f0..fN (CSV, Parquet or NPY by the extension of OUTPUT; NPY keeps paths and labels in
    the sidecar), plus a sidecar OUTPUT.json recording the backbone, layer, pool and
    preprocessing, and the table's rows and sha256.

    Example: tlearn extract sample_data/roads/train -o f.parquet --layer blocks.5
    """
    # only the command that runs loads its job (fast --help)
    from tlearn.jobs.distributed import extract

    if as_json and output == "-":
        raise UsageError("--json prints on stdout, where -o - writes the CSV; use -o FILE")
    try:
        with progress_bars(quiet) as bars:
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
                multi_label=multi_label,
                run=run_options(
                    batch_size, device, workers, quiet, bars, backend, no_cache, decode
                ),
                shard=None if shard is None else Shard.parse(shard),
            )
    except KeyboardInterrupt:
        partial = partial_path(output)
        if output != "-" and shard is None and partial.is_file():
            err.print(
                f"the rows written so far are kept in {partial}; to continue, run the same "
                "command with --resume",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        raise
    if res is None:  # a torchrun rank other than 0: rank 0 merged and reports
        return
    report_skips(res.skipped, res.warnings, quiet)
    if as_json:
        typer.echo(json.dumps(res.summary()))
    if not quiet:
        dest = "stdout" if output == "-" else res.out
        err.print(
            f"wrote {res.rows} rows x {res.feature_dim} features to {dest} in {res.seconds:.1f}s"
            f"{engine_note(res.engine)}",
            highlight=False,
            markup=False,
        )


# ----------------------------------------------------------------------------- merge


@handle_errors
def merge_cmd(
    parts: Annotated[
        list[Path], typer.Argument(help="Every part OUT.part-I-of-N of one run (any order).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The merged file to write.")],
    quiet: QuietOpt = False,
):
    """Join the parts written by extract/predict --shard I/N into the output a single
    process would have written (and OUTPUT.skipped.csv beside it). Refuses a missing, duplicated
    or foreign part.

    Example: tlearn merge features.csv.part-* -o features.csv
    """

    res = merge_parts(parts, output)
    report_skips([], res.warnings, quiet)
    if not quiet:
        if res.skipped:
            err.print(f"[yellow]{len(res.skipped)} image(s) skipped[/]", highlight=False)
        err.print(
            f"merged {res.parts} {res.kind} parts into {res.out}: {res.rows} rows",
            highlight=False,
            markup=False,
        )
