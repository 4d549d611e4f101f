"""Progress in logs (stderr not a terminal): a line every ~10 s or 10% with count, rate
and ETA; long phases without a count say they are still running."""

from __future__ import annotations

import io
import time

from rich.console import Console

from tlearn.cli.app import app
from tlearn.cli.render import LogLines


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _lines(console) -> list[str]:
    return [ln for ln in console.file.getvalue().splitlines() if ln]


def test_a_counted_stage_prints_every_ten_percent_or_ten_seconds():
    console, clock = Console(file=io.StringIO(), width=200), Clock()
    log = LogLines(console, clock=clock)
    for done in range(0, 1001):  # 1000 images at 10 images/s
        clock.t = done / 10
        log("extract", done, 1000)
    lines = _lines(console)
    assert lines[0].startswith("extract: 0/1000 (0%)")
    assert lines[-1] == "extract: 1000/1000 (100%), 10.0/s, 100s"
    assert 10 <= len(lines) <= 12  # every 10% (and every 10 s: the same moments here)
    assert any("ETA 50s" in ln for ln in lines)


def test_a_slow_stage_still_prints_every_ten_seconds():
    console, clock = Console(file=io.StringIO(), width=200), Clock()
    log = LogLines(console, clock=clock)
    for done in range(0, 51):  # 1% of the way every 5 s: 10 s between lines, not 10%
        clock.t = done * 5.0
        log("train", done, 5000)
    assert len(_lines(console)) == 26


def test_a_quick_phase_is_silent_and_a_long_one_is_not():
    console = Console(file=io.StringIO(), width=200)
    log = LogLines(console, every_s=0.3)
    log.start()
    try:
        log("load backbone", 0, 0)
        log("extract", 0, 4)
        log("extract", 4, 4)
        assert [ln for ln in _lines(console) if "load" in ln] == []
        log("export the graph", 0, 0)
        time.sleep(1.6)
    finally:
        log.stop()
    still = [ln for ln in _lines(console) if ln.startswith("export the graph ... still running")]
    assert still, _lines(console)


def test_fit_in_a_log_shows_progress_lines(runner, image_folder, tmp_path):
    """CliRunner's stderr is not a terminal: what a log gets."""
    from conftest import TINY

    r = runner.invoke(app, ["fit", str(image_folder), "-o", str(tmp_path / "m"), *TINY])
    assert r.exit_code == 0, r.output
    assert "extract train: 18/18 (100%)" in r.stderr
    assert "cross-validate C:" in r.stderr
