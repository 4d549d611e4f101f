"""Hostile inputs on the image side: formats that start outside programs, extreme aspect
ratios, symlinks, deep folders, odd names, nothing readable, orphaned workers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY, draw
from tlearn.cli.app import app

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 10 10
newpath 0 0 moveto 10 10 lineto stroke
showpage
%%EOF
"""


def _fake_program(folder: Path, name: str, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_eps_named_jpg_never_starts_ghostscript(runner, tmp_path, monkeypatch):
    data = tmp_path / "in"
    draw(data / "ok.png", (10, 200, 30), seed=1)
    (data / "photo.jpg").write_bytes(EPS)
    marker = tmp_path / "gs-ran"
    _fake_program(tmp_path / "bin", "gs", marker)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(data), "-o", str(out), "--workers", "0", *TINY])
    assert r.exit_code == 0, r.output
    assert not marker.exists(), "Ghostscript was started for an EPS file"
    assert pd.read_csv(out)["path"].tolist() == [str(data / "ok.png")]
    skipped = pd.read_csv(tmp_path / "f.csv.skipped.csv")
    assert skipped["path"].tolist() == [str(data / "photo.jpg")]
    assert "not a recognised image format" in skipped["reason"][0]


@pytest.mark.parametrize("fmt", ["EPS", "PSD", "ICO", "PPM", "TGA"])
def test_only_raster_formats_are_opened(tmp_path, fmt):
    from PIL import Image

    from tlearn.core.errors import ImageLoadError
    from tlearn.data.image import load_image

    path = tmp_path / "x.jpg"
    if fmt == "EPS":
        path.write_bytes(EPS)
    elif fmt == "PSD":
        path.write_bytes(b"8BPS\x00\x01" + b"\x00" * 40)
    else:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format=fmt)
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_raster_formats_still_open(tmp_path, fmt):
    from PIL import Image

    from tlearn.data.image import load_image

    path = tmp_path / "x.img"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(path, format=fmt)
    assert load_image(path).size == (8, 6)
