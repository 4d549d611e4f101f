"""The CLI's error policy: a TlearnError becomes one line on stderr and its exit code,
Ctrl-C exit 130, anything else one "unexpected" line and exit 1 (--debug: traceback)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from tlearn.cli.render import err
from tlearn.core.errors import TlearnError
from tlearn.core.names import printable

DEBUG = {"on": False}
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # full disk, quota, read-only


def _error_console(e: BaseException) -> tuple[Console, str]:
    """Where an error goes: stderr; under torchrun ranks other than 0 are silent, except
    for an error that happened on that rank alone (see shard.ProcessGroup)."""
    rank = getattr(e, "rank_only", None)
    if rank is not None and rank != 0 and err.quiet:
        return Console(stderr=True, soft_wrap=True), f"[red]error (rank {rank}):[/]"
    return err, "[red]error:[/]"


def quiet_broken_pipe() -> None:
    """The reader of stdout went away (`tlearn ... | head -1`): point stdout at /dev/null
    so nothing more fails or complains (the interpreter's final flush included); the
    caller then exits 1 without a message, as rich does."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def handle_errors(fn):
    """One line on stderr and a non-zero exit for anything the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TlearnError as e:
            if DEBUG["on"]:
                raise
            console, label = _error_console(e)
            console.print(f"{label} {escape(printable(str(e)))}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            quiet_broken_pipe()
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # a bug or an environment problem: still one line
            if DEBUG["on"]:
                raise
            first = printable((str(e).strip().splitlines() or [""])[0][:300])
            console, label = _error_console(e)
            if isinstance(e, OSError) and e.errno in DISK_ERRNOS:  # the disk, not a bug
                where = f"{e.filename}: " if e.filename else ""
                text = printable(where + (e.strerror or first))
                console.print(f"{label} {escape(text)}", highlight=False)
                raise typer.Exit(1) from None
            console.print(
                f"{label} unexpected {type(e).__name__}: {escape(first)} "
                "(rerun with tlearn --debug ... for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper
