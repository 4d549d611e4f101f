"""The command line (typer + rich): one module per command family, shared options
(cli.options), rendering and progress (cli.render), one error policy (cli.errors).
The library below never imports it."""

from tlearn.cli.main import main as main
