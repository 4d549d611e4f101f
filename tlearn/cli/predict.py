"""`tlearn predict` and `tlearn evaluate`, and the rendering of predictions."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tlearn.cli.errors import handle_errors
from tlearn.cli.options import (
    TTA,
    Backend,
    BackendOpt,
    BatchOpt,
    Decode,
    DecodeOpt,
    DeviceOpt,
    Format,
    LabelsOpt,
    NoCacheOpt,
    QuietOpt,
    ShardOpt,
    StrictOpt,
    TTAOpt,
    WorkersOpt,
    run_options,
)
from tlearn.cli.render import (
    confusion_table,
    err,
    metrics_table,
    out,
    pct3,
    progress_bars,
    report_skips,
)
from tlearn.core.atomic import atomic_file, check_output_parent
from tlearn.core.errors import UsageError
from tlearn.data.skipped import skipped_path, write_skipped_csv
from tlearn.report.metrics import write_reports
from tlearn.report.plots import write_evaluation_plots
from tlearn.report.predictions import choose_format, prediction_records, render_predictions
from tlearn.scale.shard import Shard, write_predictions_part

# ----------------------------------------------------------------------------- predict


@handle_errors
def predict_cmd(
    model_dir: Annotated[
        Path, typer.Argument(help="Model directory from tlearn fit, or a .onnx from tlearn export.")
    ],
    paths: Annotated[
        list[Path], typer.Argument(help="Images and/or folders (or a features table).")
    ],
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format",
            "-f",
            help="Default: from -o's extension (.csv .tsv .json .jsonl), else a table on a "
            "terminal and csv when piped.",
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="Show the K best classes.")
    ] = 1,
    all_scores: Annotated[
        bool, typer.Option("--all-scores", help="Add every class's score.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write to a file (its list of unreadable images "
            "goes to FILE.skipped.csv); - is stdout.",
        ),
    ] = None,
    strict: StrictOpt = False,
    tta: TTAOpt = TTA.none,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    decode: DecodeOpt = Decode.auto,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
):
    """Predict the class of each image: path, predicted class, score.

    Example: tlearn predict roads-model photos/ -o predictions.jsonl
    """
    # only the command that runs loads its job (fast --help)
    from tlearn.jobs.distributed import predict

    to_file = output is not None and str(output) != "-"
    chosen = choose_format(output, None if fmt is None else fmt.value, out.is_terminal)
    part = None if shard is None else Shard.parse(shard)
    if part is not None and not to_file:
        raise UsageError("--shard writes a part file: add -o FILE (csv, tsv, json or jsonl)")
    if to_file:
        check_output_parent(output)
    with progress_bars(quiet) as bars:
        res = predict(
            model_dir,
            paths,
            strict=strict,
            tta=tta.value,
            run=run_options(batch_size, device, workers, quiet, bars, backend, no_cache, decode),
            shard=part,
        )
    if res is None:  # a torchrun rank other than 0: rank 0 writes the predictions
        return
    report_skips(res.skipped, res.warnings, quiet)
    k = min(top_k, len(res.classes))
    records = prediction_records(res.predictions, k, all_scores)
    if chosen == "table":
        sys.stdout.write(predictions_table(records, k, res.score_kind))
        return
    text = render_predictions(records, chosen, res.classes, k, all_scores, res.score_kind)
    if to_file and res.part is not None:
        written = write_predictions_part(
            output,
            text,
            res.part,
            rows=len(records),
            output_format=chosen,
            model_dir=model_dir,
            options={"top_k": k, "all_scores": all_scores},
        )
        if not quiet:
            err.print(f"wrote {len(records)} predictions to {written}", highlight=False)
    elif to_file:
        write_skipped_csv(skipped_path(output), res.skipped)
        with atomic_file(output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if not quiet:
            err.print(f"wrote {len(records)} predictions to {output}", highlight=False)
    else:
        sys.stdout.write(text)


def predictions_table(records: list[dict], k: int, score_kind: str) -> str:
    """The terminal table of predictions (user-supplied names escaped for rich)."""
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


@handle_errors
def evaluate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from tlearn fit.")],
    data: Annotated[Path, typer.Argument(help="Folder of class sub-folders, or a features table.")],
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
    tta: TTAOpt = TTA.none,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    decode: DecodeOpt = Decode.auto,
    quiet: QuietOpt = False,
):
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and the confusion matrix.

    Example: tlearn evaluate roads-model sample_data/roads/val --json
    """
    # only the command that runs loads its job (fast --help)
    from tlearn.jobs.evaluate import evaluate

    if output is not None:
        check_output_parent(output)  # before any work: a missing folder is one line
    with progress_bars(quiet) as bars:
        res = evaluate(
            model_dir,
            data,
            labels_csv=labels,
            strict=strict,
            tta=tta.value,
            run=run_options(batch_size, device, workers, quiet, bars, backend, no_cache, decode),
        )
    report_skips(res.skipped, res.warnings, quiet)
    m = res.metrics
    if output is not None:
        written = write_reports(output, m, res.skipped)

        written += write_evaluation_plots(output, res)
        if not quiet:
            err.print(f"wrote {', '.join(map(str, written))}", highlight=False)
    if as_json:
        typer.echo(json.dumps(m))
        return
    out.print(metrics_table(m, f"{m['n_images']} images"))
    out.print(confusion_table(m))
    out.print(
        f"accuracy {pct3(m['accuracy'])}, balanced accuracy {pct3(m['balanced_accuracy'])}",
        highlight=False,
    )
