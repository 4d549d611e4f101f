"""Predictions users can act on, end to end from the CLI: calibrated probabilities,
conformal prediction sets (--coverage), "unknown" (--reject) and multi-label models."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, draw, make_dataset
from tlearn.cli.app import app
from tlearn.heads.posthoc import CALIBRATION_FILE


@pytest.fixture(scope="module")
def acting(tmp_path_factory):
    """Train/val folders (3 classes) and an SVM model fitted on train with the defaults."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("acting")
    make_dataset(root / "train", n=10, seed=3)
    make_dataset(root / "val", n=6, seed=4)
    model = root / "svm"
    r = CliRunner().invoke(app, ["fit", str(root / "train"), "-o", str(model), "-q", *TINY])
    assert r.exit_code == 0, r.output
    return root, model


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_fit_stores_calibration_sets_and_ood_and_predict_reports_them(acting, runner):
    root, model = acting
    cfg = json.loads((model / "config.json").read_text())
    cal = cfg["calibration"]
    assert cal["probability"]["method"] == "temperature" and cal["probability"]["temperature"] > 0
    assert cal["conformal"]["n"] == 30 and cal["ood"]["bank"] == 30
    assert (model / CALIBRATION_FILE).is_file()

    r = runner.invoke(app, ["predict", str(model), str(root / "val"), "--all-scores"])
    assert r.exit_code == 0, r.output
    rows = _rows(r.stdout)
    assert len(rows) == 18
    head = list(rows[0])
    assert head[:4] == ["path", "prediction", "score", "probability"]
    assert {"ood_score", "unknown"} <= set(head)
    for row in rows:
        probs = [float(row[f"probability_{c}"]) for c in ("asphalt", "grass", "gravel")]
        assert sum(probs) == pytest.approx(1, abs=1e-6)
        assert float(row["probability"]) == pytest.approx(max(probs), abs=1e-6)
        assert row["unknown"] in ("true", "false", "True", "False")


def test_coverage_adds_sets_that_hold_the_predicted_class(acting, runner):
    root, model = acting
    r = runner.invoke(app, ["predict", str(model), str(root / "val"), "--coverage", "0.9"])
    assert r.exit_code == 0, r.output
    rows = _rows(r.stdout)
    assert "set" in rows[0]
    for row in rows:
        members = [c for c in row["set"].split(";") if c]
        assert set(members) <= {"asphalt", "grass", "gravel"}
    ev = runner.invoke(
        app, ["evaluate", str(model), str(root / "val"), "--json", "--coverage", "0.9"]
    )
    assert ev.exit_code == 0, ev.output
    m = json.loads(ev.stdout)
    assert m["coverage_target"] == 0.9
    assert 0 <= m["coverage"] <= 1 and 0 <= m["mean_set_size"] <= 3
    assert set(m["per_class"]["grass"]) >= {"coverage", "mean_set_size"}


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "nan"])
def test_bad_coverage_is_one_line_and_exit_2(acting, runner, bad):
    root, model = acting
    r = runner.invoke(app, ["predict", str(model), str(root / "val"), "--coverage", bad])
    assert r.exit_code == 2
    assert "--coverage" in r.stderr and "Traceback" not in r.output


def test_evaluate_reports_calibration_metrics_and_writes_a_reliability_diagram(
    acting, runner, tmp_path
):
    root, model = acting
    out = tmp_path / "ev"
    r = runner.invoke(app, ["evaluate", str(model), str(root / "val"), "--json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["calibrated"] is True
    for key in ("ece", "nll", "brier"):
        assert isinstance(m[key], float) and m[key] >= 0
    assert 0 <= m["ood_flagged"] <= m["n_images"]
    with Image.open(out / "reliability.png") as img:
        assert img.size[0] > 200
    text = runner.invoke(app, ["evaluate", str(model), str(root / "val")])
    assert "ECE" in text.stdout and "unlike the training images" in text.stdout


def test_reject_prints_unknown_for_an_image_unlike_the_training_images(acting, runner, tmp_path):
    root, model = acting
    odd = tmp_path / "odd"
    odd.mkdir()
    # a checkerboard in saturated colours: nothing like the noisy flat road colours
    board = (np.indices((36, 48)).sum(axis=0) % 2).astype(np.uint8)
    pixels = np.stack([board * 255, (1 - board) * 255, np.full_like(board, 255)], axis=-1)
    Image.fromarray(pixels).save(odd / "board.png")
    Image.fromarray(255 - pixels).save(odd / "board2.png")
    r = runner.invoke(app, ["predict", str(model), str(odd), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    plain = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(p["unknown"] for p in plain), plain
    assert all(p["prediction"] != "unknown" for p in plain)
    r = runner.invoke(app, ["predict", str(model), str(odd), "--reject", "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["prediction"] for line in r.stdout.splitlines()] == ["unknown"] * 2


def test_a_model_without_calibration_still_predicts_and_says_so(acting, runner, tmp_path):
    root, model = acting
    old = tmp_path / "old"
    old.mkdir()
    for f in model.iterdir():
        if f.name != CALIBRATION_FILE:
            (old / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((old / "config.json").read_text())
    del cfg["calibration"]
    (old / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["predict", str(old), str(root / "val")])
    assert r.exit_code == 0, r.output
    assert "no calibration" in r.stderr
    assert len(_rows(r.stdout)) == 18
    r = runner.invoke(app, ["predict", str(old), str(root / "val"), "--coverage", "0.9"])
    assert r.exit_code == 2 and "refit" in r.stderr
    r = runner.invoke(app, ["predict", str(old), str(root / "val"), "--reject"])
    assert r.exit_code == 2 and "out-of-distribution" in r.stderr


def test_a_damaged_calibration_file_is_refused(acting, runner, tmp_path):
    root, model = acting
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["calibration"]["probability"]["temperature"] = -1
    (bad / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["predict", str(bad), str(root / "val")])
    assert r.exit_code != 0 and "temperature" in r.stderr and "Traceback" not in r.output


def test_neural_head_is_calibrated_on_its_validation_split(acting, runner, tmp_path):
    root, _ = acting
    out = tmp_path / "nn"
    args = ["fit", str(root / "train"), "--head", "linear", "--epochs", "2", "--val-split"]
    r = runner.invoke(app, [*args, "0.3", "-o", str(out), "-q", *TINY])
    assert r.exit_code == 0, r.output
    cal = json.loads((out / "config.json").read_text())["calibration"]
    assert cal["probability"]["method"] == "temperature"
    assert cal["conformal"]["n"] == 9 and cal["ood"]["bank_from"] == "training images"
    r = runner.invoke(app, ["predict", str(out), str(root / "val"), "--coverage", "0.8"])
    assert r.exit_code == 0, r.output
    assert "set" in _rows(r.stdout)[0]


# ----------------------------------------------------------------------------- multi-label


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    """Images whose label sets are the colours they show: left and right halves."""
    root = tmp_path_factory.mktemp("ml")
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200), "none": (128, 128, 128)}
    rng = np.random.default_rng(0)
    names = ["red", "blue", "none"]

    def write(split: str, n: int) -> Path:
        rows = ["path,label"]
        for i in range(n):
            halves = [names[rng.integers(3)], names[rng.integers(3)]]
            parts = []
            for j, h in enumerate(halves):
                p = draw(root / "tmp" / f"{split}{i}_{j}.png", colours[h], seed=i * 2 + j)
                parts.append(np.asarray(Image.open(p)))
            path = root / split / f"{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(np.concatenate(parts, axis=1)).save(path)
            labels = sorted({h for h in halves if h != "none"})
            rows.append(f"{split}/{path.name},{';'.join(labels)}")
        csv_path = root / f"{split}.csv"
        csv_path.write_text("\n".join(rows) + "\n")
        return csv_path

    return root, write("train", 40), write("val", 20)


def test_multilabel_fit_predict_evaluate(multilabel, runner, tmp_path):
    root, train_csv, val_csv = multilabel
    model = tmp_path / "ml"
    args = ["fit", str(root / "train"), "--labels", str(train_csv), "--multi-label"]
    r = runner.invoke(app, [*args, "-o", str(model), "--json", *TINY])
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)
    assert fitted["task"] == "multi-label" and sorted(fitted["classes"]) == ["blue", "red"]
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["task"] == "multi-label" and cfg["calibration"]["thresholds"] is not None

    r = runner.invoke(app, ["predict", str(model), str(root / "val"), "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    preds = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(preds) == 20
    for p in preds:
        assert set(p["probabilities"]) == {"blue", "red"}
        assert set(p["labels"]) <= {"blue", "red"}

    ev = runner.invoke(
        app, ["evaluate", str(model), str(root / "val"), "--labels", str(val_csv), "--json"]
    )
    assert ev.exit_code == 0, ev.output
    m = json.loads(ev.stdout)
    for key in ("mAP", "micro_f1", "macro_f1", "subset_accuracy"):
        assert 0 <= m[key] <= 1
    assert set(m["per_label"]["red"]) >= {"precision", "recall", "f1", "ap"}
    assert m["mAP"] > 0.8  # the colours are easy even for the random tiny backbone


def test_multilabel_extract_keeps_label_sets_and_sweep_scores_by_map(multilabel, runner, tmp_path):
    root, train_csv, _ = multilabel
    table = tmp_path / "f.csv"
    args = ["extract", str(root / "train"), "--labels", str(train_csv), "--multi-label"]
    r = runner.invoke(app, [*args, "-o", str(table), "-q", *TINY])
    assert r.exit_code == 0, r.output
    labels = {row["label"] for row in csv.DictReader(table.open())}
    assert "blue;red" in labels or "red;blue" in labels
    model = tmp_path / "from-table"
    r = runner.invoke(app, ["fit", str(table), "--multi-label", "-o", str(model), "-q"])
    assert r.exit_code == 0, r.output
    sweep = ["sweep", str(root / "train"), "--labels", str(train_csv), "--multi-label"]
    r = runner.invoke(app, [*sweep, "--layers", "blocks.1,blocks.3", "--json", *TINY])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metric"] == "mAP"


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_multilabel_neural_heads_are_refused_not_trained_as_classes(
    multilabel, runner, tmp_path, head
):
    root, train_csv, _ = multilabel
    args = ["fit", str(root / "train"), "--labels", str(train_csv), "--multi-label"]
    r = runner.invoke(app, [*args, "--head", head, "-o", str(tmp_path / "m"), *TINY])
    assert r.exit_code == 2 and "--multi-label" in r.stderr
    assert not (tmp_path / "m").exists()


def test_reject_refuses_a_model_with_a_class_named_unknown(runner, tmp_path):
    data = tmp_path / "d"
    make_dataset(data, classes=("asphalt", "grass"), n=6)
    os.rename(data / "grass", data / "unknown")
    model = tmp_path / "m"
    assert runner.invoke(app, ["fit", str(data), "-o", str(model), "-q", *TINY]).exit_code == 0
    r = runner.invoke(app, ["predict", str(model), str(data), "--reject"])
    assert r.exit_code == 2 and "unknown" in r.stderr


def _write_labels(path, rows) -> None:
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))


@pytest.mark.parametrize(
    "labelling, message",
    [
        (lambda i: "blue;red" if i % 2 else "red", "on every training image"),
        (lambda i: "red" if i % 2 else "", "at least two labels"),
    ],
)
def test_multilabel_errors_are_one_line(multilabel, runner, tmp_path, labelling, message):
    root, train_csv, _ = multilabel
    paths = [line.split(",")[0] for line in train_csv.read_text().splitlines()[1:]]
    labels = tmp_path / "labels.csv"
    _write_labels(labels, [(root / p, labelling(i)) for i, p in enumerate(paths)])
    args = ["fit", str(root / "train"), "--labels", str(labels), "--multi-label"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "m"), "-q", *TINY])
    assert r.exit_code == 1 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_multilabel_model_is_refused_where_it_does_not_fit(multilabel, runner, tmp_path):
    root, train_csv, _ = multilabel
    model = tmp_path / "ml"
    args = ["fit", str(root / "train"), "--labels", str(train_csv), "--multi-label"]
    assert runner.invoke(app, [*args, "-o", str(model), "-q", *TINY]).exit_code == 0
    r = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "multi-class" in r.stderr
    assert not (tmp_path / "m.onnx").exists()
    r = runner.invoke(app, ["evaluate", str(model), str(root / "train")])
    assert r.exit_code == 2 and "--labels" in r.stderr
    r = runner.invoke(app, ["predict", str(model), str(root / "val"), "--coverage", "0.9"])
    assert r.exit_code == 2 and "multi-label" in r.stderr
