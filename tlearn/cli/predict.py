"""`tlearn predict` and `tlearn evaluate`, and the rendering of predictions."""

from __future__ import annotations

import csv
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
from tlearn.core.atomic import atomic_file
from tlearn.core.errors import UsageError
from tlearn.data.skipped import SKIPPED_CSV, write_skipped_csv
from tlearn.report.metrics import write_reports
from tlearn.report.plots import write_evaluation_plots
from tlearn.scale.shard import Shard, write_predictions_part

# ----------------------------------------------------------------------------- predict


@handle_errors
def predict_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from tlearn fit.")],
    paths: Annotated[
        list[Path], typer.Argument(help="Images and/or folders (or a features table).")
    ],
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

    Example: tlearn predict roads-model photo1.jpg more_photos/ --format jsonl
    """
    # only the command that runs loads its job (fast --help)
    from tlearn.jobs.distributed import predict

    part = None if shard is None else Shard.parse(shard)
    if part is not None and (output is None or fmt == Format.table):
        raise UsageError("--shard writes a part file: add -o FILE, with --format csv/json/jsonl")
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
        with atomic_file(output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        write_skipped_csv(output.parent / SKIPPED_CSV, res.skipped)
        if not quiet:
            err.print(f"wrote {len(records)} predictions to {output}", highlight=False)
    else:
        sys.stdout.write(text)


def _render_predictions(records, fmt: Format, classes, k, all_scores, score_kind):

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
