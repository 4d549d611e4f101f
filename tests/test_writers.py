"""Writing -o under pressure: a full disk keeps the rows written so far and names the
file and the cause; two runs writing the same -o never mix rows (a lock on OUTPUT.partial
makes the second say so at once)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tlearn.cli.app import app
from tlearn.core.atomic import exclusive_lock
from tlearn.core.errors import OutputError
from tlearn.features.formats.common import HashingFile
from tlearn.features.table import read_table

ROOT = Path(__file__).resolve().parents[1]


def test_a_full_disk_keeps_the_partial_rows_and_names_the_file(
    runner, image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "f.csv"
    real, calls = HashingFile.write, {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] > 2:  # the header and the first batch fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(HashingFile, "write", write)
    args = ["extract", str(image_folder), "-o", str(out), "--batch-size", "4", "-q", *TINY]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, r.stderr
    assert "f.csv.partial" in line and "No space left on device" in line, line
    assert "unexpected" not in line and "--resume" in line
    partial = tmp_path / "f.csv.partial"
    assert partial.read_text().count("\n") == 1 + 4  # header + the first batch
    assert not out.exists()
    monkeypatch.undo()
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert len(read_table(out).paths) == 18
    assert not partial.exists()


def test_a_second_writer_of_the_same_output_is_told(runner, image_folder, tmp_path):
    out = tmp_path / "f.csv"
    with exclusive_lock(tmp_path / "f.csv.partial.lock", str(out)):  # another run writing
        with pytest.raises(OutputError, match="another tlearn run is writing"):
            with exclusive_lock(tmp_path / "f.csv.partial.lock", str(out)):
                pass
        r = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "-q", *TINY])
        assert r.exit_code == 1, r.output
        assert "another tlearn run is writing" in r.stderr and str(out) in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "-q", *TINY])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "f.csv.partial.lock").exists()


def test_two_processes_writing_one_output_never_mix_rows(image_folder, tmp_path):
    out = tmp_path / "f.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tlearn", "extract", str(image_folder), "-o", str(out)]
    cmd += ["-q", "--batch-size", "2", "--workers", "0", *TINY]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or "another tlearn run is writing" in err, err
        assert "unexpected" not in err
    table = read_table(out)  # complete, bound to its sidecar
    assert sorted(table.paths) == sorted(set(table.paths)) and len(table.paths) == 18
