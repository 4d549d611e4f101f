"""`tlearn export`: a model directory as one ONNX file."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tlearn.cli.errors import handle_errors
from tlearn.cli.render import err, human_size, out, report_skips


class Quantize(str, Enum):
    int8 = "int8"


@handle_errors
def export_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from tlearn fit.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")],
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 13 to 20.")] = 17,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            "--dynamic-batch/--static-batch",
            help="Any batch size, or a graph that takes exactly one image per run.",
        ),
    ] = True,
    quantize: Annotated[
        Quantize | None,
        typer.Option("--quantize", help="int8: ONNX Runtime static quantization (QDQ)."),
    ] = None,
    check: Annotated[
        Path | None,
        typer.Option(
            "--check",
            help="Images to check the graph on (scores vs tlearn's; int8 agreement). "
            "Default: synthetic images.",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration", help="--quantize int8: images for the activation ranges (32 used)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No notes.")] = False,
):
    """Export a model as one ONNX file: uint8 RGB images (N, H, W, 3) in, the scores
    `tlearn predict` reports out (and probabilities, for logreg and neural heads). How to
    resize and crop, the class names and the model's hash are in the file's metadata;
    docs/onnx_example.py runs it with onnxruntime, numpy and Pillow only.

    Example: tlearn export roads-model -o roads.onnx --quantize int8
    """
    # only the command that runs loads its job (torch for the export)
    from tlearn.jobs.export import export_model

    res = export_model(
        model_dir,
        output,
        opset=opset,
        dynamic_batch=dynamic_batch,
        quantize=None if quantize is None else quantize.value,
        check=check,
        calibration=calibration,
    )
    report_skips([], [] if quiet else res.notes, quiet)
    summary = {
        "path": str(res.path),
        "size": res.size,
        "opset": res.opset,
        "dynamic_batch": res.dynamic_batch,
        "outputs": res.outputs,
        "score_kind": res.score_kind,
        "classes": res.classes,
        "check": res.check,
        "quantized": res.quantized,
        "metadata": res.metadata,
        "seconds": round(res.seconds, 2),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    c = res.check
    out.print(
        f"wrote {escape(str(res.path))} ({human_size(res.size)}, opset {res.opset}, "
        f"{'dynamic' if res.dynamic_batch else 'static'} batch; outputs "
        f"{', '.join(res.outputs)}: {res.score_kind})",
        highlight=False,
    )
    out.print(
        f"checked on {c['images']} {escape(c['source'])} image(s): largest difference from "
        f"tlearn's scores {c['max_abs_diff']:.2g}",
        highlight=False,
    )
    q = res.quantized
    if q is not None:
        out.print(
            f"int8: {100 * q['size_ratio']:.1f}% of the fp32 file's {human_size(q['fp32_size'])}; "
            f"top-1 agrees with fp32 on {100 * q['top1_agreement']:.1f}% of {q['images']} "
            f"image(s)",
            highlight=False,
            markup=False,
        )
    if not quiet:
        err.print(f"exported in {res.seconds:.1f}s", highlight=False, markup=False)
