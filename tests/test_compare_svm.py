"""`fit --head linear|mlp --compare-svm`: the network against a linear SVM on the frozen
features at the same cut, on the same validation images; the model directory keeps the
better (a tie keeps the network), and config.json says both scores either way."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import TINY, fix_svm_accuracy
from tlearn.cli.app import app
from tlearn.train.finish import compared


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _fit(runner, data, out, *args):
    args = ["fit", str(data), "-o", str(out), "--head", "linear", "--compare-svm", *args]
    return runner.invoke(app, [*args, "--epochs", "1", "--augment", "none", *TINY])


def test_the_svm_is_kept_when_it_scores_higher(split_folder, tmp_path, runner, monkeypatch):
    fix_svm_accuracy(monkeypatch, 1.0)
    out = tmp_path / "m"
    result = _fit(runner, split_folder, out)
    assert result.exit_code == 0, result.output
    config = _config(out)
    assert config["head"]["type"] == "svm"
    c = config["compared"]
    assert c["kept"] == "svm" and c["val_accuracy"]["svm"] == 1.0
    assert c["n_val"] == 9  # split_folder/val: 3 classes x 3 images
    assert "kept the SVM (the model directory holds it, not the network)" in result.output
    assert not (out / "history.csv").exists() and not (out / "backbone.safetensors").exists()
    assert config["calibration"]  # the SVM's own calibration, fitted out of fold
    pred = runner.invoke(app, ["predict", str(out), str(split_folder / "val"), "-o", "-", "-q"])
    assert pred.exit_code == 0, pred.output
    assert len(pred.stdout.strip().splitlines()) == 1 + 9


def test_the_network_is_kept_otherwise(split_folder, tmp_path, runner, monkeypatch):
    fix_svm_accuracy(monkeypatch, 0.0)
    out = tmp_path / "m"
    result = _fit(runner, split_folder, out, "--json", "-q")
    assert result.exit_code == 0, result.output
    config = _config(out)
    assert config["head"]["type"] == "linear" and (out / "history.csv").is_file()
    c = config["compared"]
    assert c["kept"] == "network" and c["val_accuracy"]["svm"] == 0.0
    validation = json.loads((out / "metrics.json").read_text())["validation"]
    assert c["val_accuracy"]["network"] == validation["accuracy"]
    assert json.loads(result.stdout)["compared"] == c


@pytest.mark.parametrize(
    "network, svm, kept",
    [(0.9, 0.9, "network"), (0.9, 0.91, "svm"), (0.91, 0.9, "network"), (None, 0.5, "svm")],
)
def test_a_tie_keeps_the_network(network, svm, kept):
    setup = SimpleNamespace(
        settings=SimpleNamespace(compared={"accuracy": svm, "n_val": 10, "C": 0.1})
    )
    got = compared(setup, None if network is None else {"accuracy": network})
    assert got["kept"] == kept
    assert got["val_accuracy"] == {"network": network, "svm": svm}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--head", "linear", "--compare-svm"], "--compare-svm compares on validation images"),
        (["--compare-svm"], "--compare-svm applies to neural heads only"),
    ],
)
def test_compare_svm_errors(args, message, image_folder, tmp_path, runner):
    out = tmp_path / "m"
    result = runner.invoke(app, ["fit", str(image_folder), "-o", str(out), *args, *TINY])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()


def test_resume_does_not_take_compare_svm(split_folder, tmp_path, runner):
    args = ["fit", str(split_folder), "--resume", str(tmp_path / "m"), "--compare-svm"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--compare-svm applies to a new run; --resume finishes one" in result.output
