"""Shared fixtures: tiny generated image folders and a CLI runner.

Tests never touch the network: they use timm's tiny `test_*` models with random
weights (`--weights none`), and images generated here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

# Keep torch from oversubscribing the 2 CI cores when tests run decoding workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The suite pins down CPU behaviour (ONNX Runtime by default, exact agreement with one
# process, ...): on a machine with a GPU, `--device auto` would pick it and the same tests
# would check something else. Hide GPUs, here and in the processes tests start, unless
# TLEARN_TEST_GPU=1 (then run tests/test_gpu.py, which needs one).
if os.environ.get("TLEARN_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

TINY = ["--model", "test_efficientnet", "--weights", "none"]
CLASS_COLORS = {
    "asphalt": (60, 60, 65),
    "gravel": (170, 160, 140),
    "grass": (40, 150, 40),
    "sky": (90, 140, 230),
}


def draw(path: Path, color, seed: int, size=(48, 36), fmt: str | None = None) -> Path:
    """A class-coloured image with per-image noise and a gradient, so classes are
    separable but no two images are identical."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.asarray(color, dtype=np.float32)
    grad = np.linspace(-30, 30, w, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 18, (h, w, 3)).astype(np.float32)
    pixels = np.clip(base + grad * rng.uniform(-1, 1) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_dataset(root: Path, classes=("asphalt", "gravel", "grass"), n: int = 6, seed: int = 0):
    """root/<class>/<i>.{jpg,png}: n images per class, half JPEG, half PNG."""
    paths = []
    for k, name in enumerate(classes):
        for i in range(n):
            ext = "jpg" if i % 2 == 0 else "png"
            p = root / name / f"{name}_{i:02d}.{ext}"
            paths.append(draw(p, CLASS_COLORS[name], seed=seed * 1000 + k * 100 + i))
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes x 6 images in class sub-folders."""
    root = tmp_path / "data"
    make_dataset(root)
    return root


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """DATA/train and DATA/val, three classes."""
    root = tmp_path / "split"
    make_dataset(root / "train", n=6, seed=1)
    make_dataset(root / "val", n=3, seed=2)
    return root


@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory):
    """Tests never touch the user's ~/.cache: one fresh feature cache per session. Sharing it
    between tests is safe (features are keyed by file content and cut) and lets exported
    ONNX models be reused; tests about the cache itself use their own folder."""
    old = {k: os.environ.get(k) for k in ("TLEARN_CACHE_DIR", "TLEARN_OFFLINE")}
    os.environ["TLEARN_CACHE_DIR"] = str(tmp_path_factory.mktemp("tlearn-cache"))
    os.environ["TLEARN_OFFLINE"] = "1"  # tests never touch the network, not even to probe it
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def fitted_model(tmp_path, image_folder, runner) -> Path:
    """A linear SVM model directory fitted on `image_folder` with the tiny test model."""
    from tlearn.cli.app import app

    out = tmp_path / "model"
    result = runner.invoke(app, ["fit", str(image_folder), "-o", str(out), "-q", *TINY])
    assert result.exit_code == 0, result.output
    return out


def fix_svm_accuracy(monkeypatch, accuracy: float) -> None:
    """--compare-svm sees this validation accuracy for the SVM (the rest of its metrics
    are real), so a test decides which side wins."""
    import tlearn.jobs.compare_svm as compare  # the seam the comparison scores through

    real = compare.classification_metrics

    def fixed(y_true, y_pred, classes):
        return {**real(y_true, y_pred, classes), "accuracy": accuracy}

    monkeypatch.setattr(compare, "classification_metrics", fixed)
