"""`tlearn audit`: duplicates, likely label errors, outliers, class balance and
unreadable files of a labelled image set."""

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
    DeviceOpt,
    LabelsOpt,
    LayerOpt,
    ModelOpt,
    NoCacheOpt,
    Pool,
    PoolOpt,
    QuietOpt,
    WeightsOpt,
    WorkersOpt,
    run_options,
)
from tlearn.cli.render import engine_note, err, progress_bars, report_skips


@handle_errors
def audit_cmd(
    data: Annotated[
        Path, typer.Argument(help="Folder of class sub-folders (or with train/ and val/).")
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Report folder: CSVs, contact sheets, audit.json."),
    ],
    val: Annotated[
        Path | None, typer.Option("--val", help="Validation folder, checked for leakage too.")
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold", help="Near duplicates: cosine similarity of pooled features, at least."
        ),
    ] = 0.83,
    neighbours: Annotated[
        int, typer.Option("--neighbours", help="Outliers: nearest same-class images averaged.")
    ] = 5,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.")] = 5,
    C: Annotated[
        str, typer.Option("--C", help="Logistic regression's C: auto (by CV) or a number.")
    ] = "auto",
    max_pairs: Annotated[
        int, typer.Option("--max-pairs", help="List at most this many duplicate pairs.")
    ] = 200_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed for folds and solvers.")] = 0,
    model: ModelOpt = "tf_efficientnet_lite0",
    weights: WeightsOpt = "auto",
    layer: LayerOpt = None,
    pool: PoolOpt = Pool.avg,
    labels: LabelsOpt = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    quiet: QuietOpt = False,
):
    """Audit a labelled image set: exact and near duplicates (leakage across train/val
    first), likely label errors (confident learning on out-of-fold probabilities),
    outliers, class balance and unreadable files. Summary on stderr, report in -o.

    Example: tlearn audit photos/ --val photos_val/ -o audit-report
    """
    # only the command that runs loads its job (fast --help)
    from tlearn.jobs.audit import audit
    from tlearn.jobs.audit_write import summary

    with progress_bars(quiet) as bars:
        res = audit(
            data,
            output,
            val=val,
            labels_csv=labels,
            model=model,
            weights=weights,
            layers=layer,
            pool=pool.value,
            threshold=threshold,
            neighbours=neighbours,
            folds=folds,
            C=C,
            seed=seed,
            max_pairs=max_pairs,
            run=run_options(batch_size, device, workers, quiet, bars, backend, no_cache),
        )
    report_skips([], res.warnings, quiet)
    if not quiet:
        err.print(summary_table(res))
        err.print(
            f"{len(res.paths)} images audited in {res.seconds:.1f}s; features"
            f"{engine_note(res.engine)}; report in {escape(str(output))}",
            highlight=False,
        )
    if as_json:
        typer.echo(json.dumps(summary(res)))


def summary_table(res) -> Table:
    table = Table(title="audit")
    for col in ("finding", "count", "file"):
        table.add_column(col, justify="right" if col == "count" else "left")
    d = res.duplicates
    exact = sum(p.kind == "exact" for p in d)
    table.add_row("leakage: duplicates across train/val", str(res.leakage), "duplicates.csv")
    table.add_row("exact duplicate pairs", str(exact), "duplicates.csv")
    table.add_row(
        f"near duplicate pairs (similarity >= {res.threshold:g})",
        str(len(d) - exact),
        "duplicates.csv",
    )
    confident = sum(i.confident for i in res.issues)
    table.add_row("likely label errors (confident learning)", str(confident), "label_issues.csv")
    table.add_row(
        "other images predicted as another class", str(len(res.issues) - confident), "(same)"
    )
    table.add_row("outliers", str(len(res.outliers)), "outliers.csv")
    table.add_row("unreadable files", str(len(res.unreadable)), "skipped.csv")
    counts = [b["train"] + b["val"] for b in res.balance]
    ratio = max(counts) / max(1, min(counts)) if counts else 1.0
    balance = ", ".join(f"{escape(b['class'])} {b['train'] + b['val']}" for b in res.balance[:8])
    more = ", ..." if len(res.balance) > 8 else ""
    table.add_row(f"classes: {balance}{more}", f"{ratio:.1f}x", "class_balance.csv")
    return table
