"""A reader that closes the pipe early (`tlearn ... | head -1`): every command printing
to stdout stops quietly, without "unexpected BrokenPipeError"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _closed_early(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlearn", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
    )
    proc.stdout.close()  # like `| head -0`: every write to stdout meets a closed pipe
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    "args",
    [["models"], ["extract", "{data}", "-o", "-", "-q", *TINY], ["cache", "info", "--json"]],
    ids=["models", "extract", "cache-info"],
)
def test_a_closed_pipe_ends_quietly(tmp_path, args):
    data = tmp_path / "data"
    make_dataset(data, n=2)
    rc, err = _closed_early([a.replace("{data}", str(data)) for a in args], tmp_path)
    assert "BrokenPipe" not in err and "Traceback" not in err and "unexpected" not in err, err
    assert err.strip() == "", err
    assert rc == 1
