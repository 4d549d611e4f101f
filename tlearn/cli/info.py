"""`tlearn models` and `tlearn layers`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tlearn.cli.errors import handle_errors
from tlearn.cli.render import err, out

# ----------------------------------------------------------------------------- models / layers


@handle_errors
def models_cmd(
    pattern: Annotated[str | None, typer.Argument(help="Filter, e.g. 'resnet*' or 'lite'.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Only models usable offline.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """List timm architectures, marking those whose weights are available offline now.

    Example: tlearn models lite
    """
    # torch + timm: only the command that runs loads them
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
        f"{len(rows)} model(s); {sum(r.offline for r in rows)} usable offline",
        highlight=False,
        markup=False,
    )


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
    # torch + timm: only the command that runs loads them
    from tlearn.jobs.layers import layer_table

    res = layer_table(model, input_size, plot)
    layers, size = res.layers, res.input_size
    if res.plot is not None:
        err.print(f"wrote {res.plot}", highlight=False, markup=False)
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
    table = Table(title=f"{escape(model)} at {size}x{size}: where it can be cut")
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
            escape(li.name),
            escape(li.type),
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
        markup=False,
    )
