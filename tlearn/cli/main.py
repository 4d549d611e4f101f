"""`tlearn` / `python -m tlearn` / `torchrun -m tlearn`: run the app; under torchrun a rank
leaves without the interpreter's teardown (see scale.group.exit_rank)."""

from __future__ import annotations

from tlearn.cli.app import app
from tlearn.cli.errors import quiet_broken_pipe
from tlearn.core.system import dist_env
from tlearn.scale.group import exit_rank


def main() -> None:

    if dist_env() is None:
        try:
            app()
        except BrokenPipeError:  # outside a command's handler (e.g. --help | head -1)
            quiet_broken_pipe()
            raise SystemExit(1) from None
        return
    # Under torchrun: leave without the interpreter's teardown (see shard.exit_rank).
    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code

    exit_rank(code)
