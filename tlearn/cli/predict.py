"""`tlearn predict` and `tlearn evaluate`, and the rendering of predictions."""

from __future__ import annotations

import contextlib
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
from tlearn.core.errors import NothingReadError, UsageError
from tlearn.data.skipped import nothing_read, skipped_path, write_skipped_csv
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
    tta: TTAOpt = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    decode: DecodeOpt = Decode.auto,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    coverage: Annotated[
        float | None,
        typer.Option(
            "--coverage",
            help="Add a `set` column: the classes that hold the true one with this "
            "probability (split-conformal; e.g. 0.9).",
        ),
    ] = None,
    reject: Annotated[
        bool,
        typer.Option(
            "--reject",
            help="Print `unknown` as the prediction of images unlike the training images.",
        ),
    ] = False,
):
    """Predict the class of each image: path, predicted class, score, calibrated
    probability, and whether the image is unlike the training images (ood_score,
    unknown). A multi-label model gives the set of labels and every label's probability.

    Example: tlearn predict roads-model photos/ -o predictions.jsonl

    Example: tlearn predict roads-model photos/ --coverage 0.9 --reject
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
    with listing_skipped(output, part), progress_bars(quiet) as bars:
        res = predict(
            model_dir,
            paths,
            strict=strict,
            tta=tta.value if tta else None,
            run=run_options(batch_size, device, workers, quiet, bars, backend, no_cache, decode),
            shard=part,
            coverage=coverage,
            reject=reject,
        )
    if res is None:  # a torchrun rank other than 0: rank 0 writes the predictions
        return
    report_skips(res.skipped, res.warnings, quiet)
    k = min(top_k, len(res.classes))
    layout = res.decisions
    records = prediction_records(res.predictions, k, all_scores, layout)
    if chosen == "table":
        sys.stdout.write(predictions_table(records, k, res.score_kind, layout))
        return
    text = render_predictions(records, chosen, res.classes, k, all_scores, res.score_kind, layout)
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
            err.print(
                f"wrote {len(records)} predictions to {written}", highlight=False, markup=False
            )
    elif to_file:
        write_skipped_csv(skipped_path(output), res.skipped)
        with atomic_file(output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if not quiet:
            err.print(
                f"wrote {len(records)} predictions to {output}", highlight=False, markup=False
            )
    else:
        sys.stdout.write(text)


@contextlib.contextmanager
def listing_skipped(output, part):
    """Not one image read (exit 3): with an output file (not a shard's part), its skipped
    list is written and the error names it."""
    try:
        yield
    except NothingReadError as e:
        if output is None or str(output) == "-" or part is not None:
            raise
        raise nothing_read(e.where, e.skipped, skipped_path(output)) from None


def predictions_table(records: list[dict], k: int, score_kind: str, layout=None) -> str:
    """The terminal table of predictions (user-supplied names escaped for rich)."""
    multi = layout is not None and layout.multi_label
    what = "labels with probabilities" if multi else f"score: {score_kind}"
    table = Table(title=f"predictions ({what})")
    table.add_column("path", overflow="fold")
    table.add_column("labels" if multi else "prediction")
    columns = [] if multi else [("score", "score")]
    if layout is not None:
        columns += [("probability", "probability")] if layout.probability and not multi else []
        columns += [("set", "set")] if layout.set else []
        columns += [("ood score", "ood_score"), ("unknown", "unknown")] if layout.ood else []
    for title, _ in columns:
        table.add_column(title, justify="left" if title in ("set", "unknown") else "right")
    if k > 1 and not multi:
        table.add_column(f"top {k}")
    for r in records:
        if multi:
            shown = ", ".join(f"{c} {r['probabilities'][c]:.2f}" for c in r["labels"] or [])
            row = [escape(r["path"]), escape(r["prediction"] if not r["labels"] else shown)]
        else:
            row = [escape(r["path"]), escape(r["prediction"])]
        for _, key in columns:
            v = r[key]
            if key == "set":
                row.append(escape("{" + ", ".join(v) + "}"))
            elif key == "unknown":
                row.append("yes" if v else "no")
            else:
                row.append("-" if v is None else f"{v:.3f}")
        if k > 1 and not multi:
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
            help="Write metrics.json, confusion.csv, confusion.png, worst.png and "
            "reliability.png here.",
        ),
    ] = None,
    labels: LabelsOpt = None,
    strict: StrictOpt = False,
    tta: TTAOpt = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    backend: BackendOpt = Backend.auto,
    no_cache: NoCacheOpt = False,
    decode: DecodeOpt = Decode.auto,
    quiet: QuietOpt = False,
    coverage: Annotated[
        float | None,
        typer.Option(
            "--coverage",
            help="Also measure the prediction sets at this coverage (e.g. 0.9): empirical "
            "coverage and mean set size, per class too.",
        ),
    ] = None,
):
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and the confusion matrix;
    ECE, NLL and Brier score of the probabilities; how many images look unlike the
    training images. Multi-label models: mAP, micro/macro F1, subset accuracy.

    Example: tlearn evaluate roads-model roads/val --json --coverage 0.9
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
            tta=tta.value if tta else None,
            run=run_options(batch_size, device, workers, quiet, bars, backend, no_cache, decode),
            coverage=coverage,
        )
    report_skips(res.skipped, res.warnings, quiet)
    m = res.metrics
    if output is not None:
        written = write_reports(output, m, res.skipped)

        written += write_evaluation_plots(output, res)
        if not quiet:
            err.print(f"wrote {', '.join(map(str, written))}", highlight=False, markup=False)
    if as_json:
        typer.echo(json.dumps(m))
        return
    if res.task == "multi-label":
        out.print(multilabel_table(m))
    else:
        out.print(metrics_table(m, f"{m['n_images']} images"))
        out.print(confusion_table(m))
        out.print(
            f"accuracy {pct3(m['accuracy'])}, balanced accuracy {pct3(m['balanced_accuracy'])}",
            highlight=False,
            markup=False,
        )
    for line in acting_lines(m):
        out.print(line, highlight=False, markup=False)


def multilabel_table(m: dict) -> Table:
    t = Table(title=f"{m['n_images']} images, multi-label")
    for col in ("label", "precision", "recall", "F1", "AP", "support"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for label, r in m["per_label"].items():
        ap = "-" if r["ap"] is None else f"{r['ap']:.3f}"
        t.add_row(escape(label), f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                  f"{r['f1']:.3f}", ap, str(r["support"]))  # fmt: skip
    return t


def acting_lines(m: dict) -> list[str]:
    """Summary lines: multi-label scores, calibration, coverage, out-of-distribution."""
    lines = []
    if m.get("task") == "multi-label":
        f = {k: "-" if m.get(k) is None else f"{m[k]:.3f}" for k in
             ("mAP", "micro_f1", "macro_f1", "subset_accuracy")}  # fmt: skip
        lines.append(
            f"mAP {f['mAP']}, micro F1 {f['micro_f1']}, macro F1 {f['macro_f1']}, "
            f"subset accuracy {f['subset_accuracy']}"
        )
    if m.get("ece") is not None:
        how = "calibrated" if m.get("calibrated") else "not calibrated"
        lines.append(
            f"probabilities ({how}): ECE {m['ece']:.3f}, NLL {m['nll']:.3f}, Brier {m['brier']:.3f}"
        )
    if m.get("coverage_target") is not None and m.get("coverage") is not None:
        lines.append(
            f"prediction sets at {m['coverage_target']:g}: coverage {m['coverage']:.3f}, "
            f"mean set size {m['mean_set_size']:.2f}, {m['empty_sets']} empty"
        )
    if m.get("ood_flagged") is not None:
        lines.append(f"unlike the training images (unknown): {m['ood_flagged']} of {m['n_images']}")
    return lines
