"""The `tlearn` command: the typer app, its global options, and every command registered
from its family module. Each command parses options, calls one library function and
renders the result.

Results go to stdout, messages and progress to stderr. Exit codes: 0 success,
1 error (bad input, missing file, unloadable model), 2 usage error, 3 unreadable
images (any under --strict; without it, when not one image could be read), 130
interrupted.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperOption

import tlearn.cli.analysis as analysis
import tlearn.cli.audit as audit
import tlearn.cli.export as export
import tlearn.cli.extract as extract
import tlearn.cli.fit as fit
import tlearn.cli.info as info
import tlearn.cli.predict as predict
from tlearn.cli.cache import cache_app
from tlearn.cli.errors import DEBUG, handle_errors
from tlearn.cli.render import err, out
from tlearn.core.system import is_secondary_rank
from tlearn.core.version import __version__
from tlearn.scale.group import check_torchrun_command


def _flags_show_no_type() -> None:
    """typer 0.29 prints `<bool>` after every on/off flag in --help (--quiet <bool>,
    --help <bool>), which reads as if the flag took a value: flags show no type."""
    shown = TyperOption.display_type_rich
    if getattr(shown, "tlearn_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_bool_flag", False) and self.metavar is None:
            return None
        return shown(self, ctx)

    display_type_rich.tlearn_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()
app = typer.Typer(
    name="tlearn",
    help="Transfer learning on image folders: cut a pretrained backbone at any layer, "
    "fit a linear SVM or logistic regression on its features, predict and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


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

    if is_secondary_rank():  # under torchrun only rank 0 prints
        out.quiet = err.quiet = True
    handle_errors(check_torchrun_command)(ctx.invoked_subcommand)


app.add_typer(cache_app, name="cache")
# One module per command family (tlearn.cli.<family>); registered here in help order.
app.command("models")(info.models_cmd)
app.command("layers")(info.layers_cmd)
app.command("extract")(extract.extract_cmd)
app.command("fit")(fit.fit_cmd)
app.command("predict")(predict.predict_cmd)
app.command("evaluate")(predict.evaluate_cmd)
app.command("sweep")(analysis.sweep_cmd)
app.command("heatmap")(analysis.heatmap_cmd)
app.command("merge")(extract.merge_cmd)
app.command("audit")(audit.audit_cmd)
app.command("export")(export.export_cmd)
