"""Hostile inputs on the image side: formats that start outside programs, extreme aspect
ratios, symlinks, deep folders, odd names, nothing readable, orphaned workers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY, draw, make_dataset
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


# ----------------------------------------------------------------------------- scanning


def test_symlinked_folder_into_another_class_is_an_error(tmp_path):
    from tlearn.core.errors import DataError
    from tlearn.data.scan import scan_class_folders

    root = tmp_path / "data"
    make_dataset(root, classes=("asphalt", "grass"), n=2)
    os.symlink(root / "grass", root / "asphalt" / "more")
    with pytest.raises(DataError, match=r"same file as .*class 'asphalt'.*remove the link"):
        scan_class_folders(root)


def test_symlinked_file_into_another_class_fails_fit(runner, tmp_path):
    root = tmp_path / "data"
    make_dataset(root, classes=("asphalt", "grass"), n=2)
    os.symlink(root / "grass" / "grass_00.jpg", root / "asphalt" / "x.jpg")
    r = runner.invoke(app, ["fit", str(root), "-o", str(tmp_path / "m"), *TINY])
    assert r.exit_code == 1, r.output
    assert "same file" in r.output and "two labels" in r.output
    assert not (tmp_path / "m").exists()


def test_same_class_links_count_once_with_a_note(tmp_path):
    from tlearn.data.scan import scan_class_folders

    root = tmp_path / "data"
    make_dataset(root, classes=("asphalt", "grass"), n=2)
    os.symlink(root / "grass", root / "grass" / "loop")  # a loop, too
    os.link(root / "asphalt" / "asphalt_00.jpg", root / "asphalt" / "hard.jpg")
    images = scan_class_folders(root)
    assert len(images) == 4
    assert images.labels == [0, 0, 1, 1]
    assert any("counted once" in w and "2 file(s)" not in w for w in images.warnings)
    assert sum("counted once" in w for w in images.warnings) == 1


def test_file_linked_into_val_is_counted_once_in_train(tmp_path):
    from tlearn.data.scan import resolve_dataset

    root = tmp_path / "split"
    make_dataset(root / "train", classes=("asphalt", "grass"), n=2, seed=1)
    make_dataset(root / "val", classes=("asphalt", "grass"), n=1, seed=2)
    os.symlink(root / "train" / "grass" / "grass_00.jpg", root / "val" / "grass" / "x.jpg")
    train, val = resolve_dataset(root)
    assert len(train) == 4 and len(val) == 2
    assert any("counted once" in w for w in train.warnings)


def test_predict_inputs_follow_each_real_file_once(tmp_path):
    from tlearn.data.scan import scan_inputs

    data = tmp_path / "in"
    a = draw(data / "a.png", (1, 2, 3), seed=1)
    os.symlink(a, data / "b.png")
    images = scan_inputs([data, a])
    assert images.paths == [str(a)]
    assert any("counted once" in w for w in images.warnings)


def test_very_deep_folders_do_not_recurse(tmp_path):
    from tlearn.data.scan import scan_class_folders, scan_inputs

    root = tmp_path / "d"
    deep = root / "cls"
    deep.mkdir(parents=True)
    for _ in range(1500):  # (pathlib's and os's makedirs recurse themselves)
        deep = deep / "d"
        os.mkdir(deep)
    try:
        draw(deep / "x.png", (1, 2, 3), seed=1)
        draw(root / "cls" / "y.png", (1, 2, 3), seed=2)
        assert sys.getrecursionlimit() < 1500
        images = scan_class_folders(root)
        assert sorted(images.paths) == sorted([str(deep / "x.png"), str(root / "cls" / "y.png")])
        assert len(scan_inputs([root])) == 2
    finally:
        _remove_deep_tree(root)  # pytest's own clean-up (shutil.rmtree) would recurse


def _remove_deep_tree(top: Path) -> None:
    folders, stack = [], [str(top)]
    while stack:
        folder = stack.pop()
        folders.append(folder)
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)


def test_walk_order_is_by_path_components(tmp_path):
    from tlearn.data.scan import scan_inputs

    for rel in ["a/z.png", "a.png", "a/b/c.png", "b.png", "a/a.png"]:
        draw(tmp_path / "in" / rel, (1, 2, 3), seed=len(rel))
    got = [os.path.relpath(p, tmp_path / "in") for p in scan_inputs([tmp_path / "in"]).paths]
    assert got == ["a/a.png", "a/b/c.png", "a/z.png", "a.png", "b.png"]


@pytest.mark.parametrize(
    ("name", "cell"),
    [(" lead.png", '" lead.png"'), ("trail.png ", '"trail.png "'), ("trail2.png ", "trail2.png ")],
)
def test_labels_csv_keeps_spaces_that_are_part_of_the_name(tmp_path, name, cell):
    from tlearn.data.labels import read_labels_csv

    draw(tmp_path / name, (1, 2, 3), seed=1, fmt="PNG")
    draw(tmp_path / "other.png", (1, 2, 3), seed=2)
    (tmp_path / "labels.csv").write_text(f"path,label\n{cell},a\n other.png , b\n")
    images = read_labels_csv(tmp_path / "labels.csv")
    assert images.paths == [str(tmp_path / name), str(tmp_path / "other.png")]
    assert images.classes == ["a", "b"]


def test_labels_csv_same_file_under_two_labels_is_an_error(tmp_path):
    from tlearn.core.errors import DataError
    from tlearn.data.labels import read_labels_csv

    draw(tmp_path / "a.png", (1, 2, 3), seed=1)
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,x\nb.png,y\n")
    with pytest.raises(DataError, match="two labels"):
        read_labels_csv(tmp_path / "labels.csv")


# ----------------------------------------------------------------------------- aspect ratios


@pytest.fixture
def resize_sizes(monkeypatch):
    """The sizes of every image Pillow's resize makes (in pixels)."""
    from PIL import Image

    made: list[int] = []
    real = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        made.append(size[0] * size[1])
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return made


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (30000, 7)])
def test_extreme_aspect_ratio_resizes_only_what_the_crop_keeps(resize_sizes, size):
    from PIL import Image

    from tlearn.data.pixels import MAX_INTERMEDIATE_PIXELS, PilSteps

    steps = PilSteps(resize=(256,), interpolation="bicubic", crop=(224, 224))
    h, w = steps.output_size(*size)
    assert h * w > 50 * MAX_INTERMEDIATE_PIXELS  # what the plain resize would have made
    pixels = steps(Image.new("RGB", size, (200, 10, 10)))
    assert pixels.shape == (224, 224, 3)
    assert max(resize_sizes) <= 224 * 224
    assert (pixels[100:120, 100:120] == (200, 10, 10)).all()


@pytest.mark.parametrize(
    "interpolation", ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
)
@pytest.mark.parametrize(
    ("size", "resize", "crop"),
    [
        ((900, 7), (40,), (32, 32)),
        ((5, 700), (33,), (32, 30)),
        ((800, 9), (20,), (32, 32)),
        ((3000, 70), (24,), (20, 20)),
        ((60, 1000), (40,), (32, 32)),
    ],
)
def test_cropped_resize_gives_the_same_pixels(monkeypatch, interpolation, size, resize, crop):
    import numpy as np
    from PIL import Image

    from tlearn.data import pixels as px

    # a smooth picture: the crop-first resize may round in another order (and nearest may
    # pick a neighbouring source pixel), so the same picture, not the same bits
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = [xx * 255 / size[0], yy * 255 / size[1], (xx + yy) * 127 / sum(size)]
    img = Image.fromarray(np.stack(rgb, -1).astype(np.uint8))
    steps = px.PilSteps(resize=resize, interpolation=interpolation, crop=crop)
    whole = steps(img)
    monkeypatch.setattr(px, "MAX_INTERMEDIATE_PIXELS", 16)
    cropped = steps(img)
    assert cropped.shape == whole.shape
    assert np.abs(cropped.astype(int) - whole.astype(int)).max() <= 2


def test_extract_handles_extreme_strips(runner, tmp_path):
    from PIL import Image

    data = tmp_path / "in"
    data.mkdir()
    Image.new("RGB", (20000, 1), (9, 9, 9)).save(data / "wide.png")
    Image.new("RGB", (1, 20000), (9, 9, 9)).save(data / "tall.png")
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(data), "-o", str(out), "--workers", "0", *TINY])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(out)) == 2


def test_torch_eval_transform_is_bounded_too(resize_sizes):
    from PIL import Image

    from tlearn.runtime.transforms import eval_transform

    cfg = {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875,
    }
    x = eval_transform(cfg)(Image.new("RGB", (1, 60000), (9, 9, 9)))
    assert tuple(x.shape) == (3, 32, 32)
    assert max(resize_sizes) <= 32 * 32


def test_aspect_guard_refuses_what_it_cannot_bound():
    from PIL import Image

    from tlearn.data.pixels import AspectGuard

    guard = AspectGuard(256)
    ok = Image.new("RGB", (4000, 1000))
    assert guard(ok) is ok
    with pytest.raises(ValueError, match="aspect ratio too extreme"):
        guard(Image.new("RGB", (20000, 1)))


def test_gpu_reader_leaves_extreme_jpegs_to_the_cpu_path(tmp_path):
    from PIL import Image

    from tlearn.data.pixels import PilSteps
    from tlearn.runtime.gpu_decode import read_item

    steps = PilSteps(resize=(256,), interpolation="bicubic", crop=(224, 224))
    Image.new("RGB", (60000, 2), (9, 9, 9)).save(tmp_path / "strip.jpg")
    Image.new("RGB", (300, 200), (9, 9, 9)).save(tmp_path / "photo.jpg")
    strip = read_item(str(tmp_path / "strip.jpg"), steps, None, False)
    assert strip.data is None and strip.pixels.shape == (224, 224, 3)
    assert read_item(str(tmp_path / "photo.jpg"), steps, None, False).data is not None


# ----------------------------------------------------------------------------- worker processes

_WORKERS_SCRIPT = """
import sys, time
import numpy as np
from PIL import Image

class Slow:  # a decode that takes long enough to kill the parent meanwhile
    def __call__(self, img):
        time.sleep(60)
        return np.zeros((4, 4, 3), np.uint8)

path = sys.argv[2]
Image.new("RGB", (8, 8)).save(path)
if sys.argv[1] == "pool":
    from tlearn.data.decode import decoded_batches
    batches = decoded_batches([path] * 8, Slow(), batch_size=1, workers=2, min_size=None,
                              keyed=False)
else:
    from tlearn.runtime.loader import image_loader
    batches = image_loader([path] * 8, Slow(), batch_size=1, workers=2)
for _ in batches:
    pass
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["pool", "dataloader"])
def test_decoding_workers_end_with_their_parent(tmp_path, kind):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKERS_SCRIPT, kind, str(tmp_path / "x.png")], env=env
    )
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.1)
            workers = _children(proc.pid)
        assert len(workers) >= 2, "the workers did not start"
        time.sleep(0.5)  # let them reach the slow decode
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(2)
        assert [w for w in workers if _alive(w)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # any left behind by a failure
            if _alive(w):
                os.kill(w, signal.SIGKILL)
