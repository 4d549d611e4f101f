"""`tlearn cache info|clear`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tlearn.cache.admin import cache_info, clear_cache
from tlearn.cache.store import cache_root
from tlearn.cli.errors import handle_errors
from tlearn.cli.options import QuietOpt
from tlearn.cli.render import err, human_size, out

# ----------------------------------------------------------------------------- cache

cache_app = typer.Typer(
    help="The feature cache: features of images already seen, and exported ONNX models.",
    no_args_is_help=True,
)


@cache_app.command("info")
@handle_errors
def cache_info_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Where the cache is ($TLEARN_CACHE_DIR, else $XDG_CACHE_HOME/tlearn, else
    ~/.cache/tlearn), and what it holds per backbone/layer/pool.

    Example: tlearn cache info
    """

    info = cache_info()
    if as_json:
        typer.echo(json.dumps(asdict(info)))
        return
    table = Table(title=f"feature cache in {escape(str(info.root))}")
    for col in ("model", "layers", "pool", "images", "dim", "size"):
        table.add_column(col, justify="right" if col in ("images", "dim", "size") else "left")
    for c in info.cuts:
        table.add_row(
            escape(c.model),
            escape(",".join(c.layers)),
            escape(c.pool),
            str(c.images),
            "" if c.dim is None else str(c.dim),
            human_size(c.bytes),
        )
    out.print(table)
    out.print(
        f"{sum(c.images for c in info.cuts)} cached feature vectors, {info.onnx_models} exported "
        f"ONNX model(s) ({human_size(info.onnx_bytes)}); {human_size(info.total_bytes)} in all",
        highlight=False,
        markup=False,
    )


@cache_app.command("clear")
@handle_errors
def cache_clear_cmd(quiet: QuietOpt = False):
    """Delete cached features, exported ONNX models and resolved cuts (rebuilt when needed).

    Example: tlearn cache clear
    """

    freed = clear_cache()
    if not quiet:
        err.print(
            f"cleared {cache_root()} ({human_size(freed)} freed)", highlight=False, markup=False
        )
