"""Plots: evaluate -o (confusion + worst mistakes), layers --plot, training curves."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import CLASS_COLORS, draw
from tlearn.cli.app import app
from tlearn.report.plots import plot_curves, worst_mistakes


def _png_ok(path, min_side=200):
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 5_000
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert min(img.shape[:2]) >= min_side
    assert img.std() > 5  # not blank
    return img.shape


def test_evaluate_output_writes_confusion_and_worst_mistakes(tmp_path, fitted_model, runner):
    # Grass-coloured images filed under "asphalt": the model gets them wrong.
    data = tmp_path / "eval"
    for i in range(3):
        draw(data / "asphalt" / f"wrong_{i}.png", CLASS_COLORS["grass"], seed=500 + i)
        draw(data / "gravel" / f"right_{i}.png", CLASS_COLORS["gravel"], seed=600 + i)
        draw(data / "grass" / f"right_{i}.png", CLASS_COLORS["grass"], seed=700 + i)
    out = tmp_path / "report"
    r = runner.invoke(app, ["evaluate", str(fitted_model), str(data), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["confusion"]["matrix"][0][1] == 3  # asphalt predicted as grass
    _png_ok(out / "confusion.png")
    _png_ok(out / "worst.png")
    assert (out / "confusion.csv").is_file()


def test_worst_mistakes_are_the_most_confident_errors():
    paths = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([1, 0, 0, 0])
    scores = np.array([[0.4, 0.6], [0.9, 0.1], [0.99, 0.01], [0.7, 0.3]])
    worst = worst_mistakes(paths, y_true, y_pred, scores, ["ant", "bee"])
    assert [w["path"] for w in worst] == ["c.jpg", "d.jpg", "a.jpg"]
    assert worst[0]["true"] == "bee" and worst[0]["predicted"] == "ant"
    assert "true bee, predicted ant (0.99)" in worst[0]["caption"]
    assert len(worst_mistakes(paths, y_true, y_pred, scores, ["ant", "bee"], limit=2)) == 2


def test_layers_plot(tmp_path, runner):
    png = tmp_path / "layers.png"
    r = runner.invoke(app, ["layers", "test_efficientnet", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "blocks.4" in r.stdout  # the table is still printed
    _png_ok(png)


def test_plot_curves(tmp_path):
    hist = tmp_path / "history.csv"
    rows = ["epoch,lr,train_loss,train_acc,val_loss,val_acc"]
    for e in range(1, 7):
        rows.append(f"{e},{1e-3 / e},{1.5 / e},{0.5 + e / 20},{1.6 / e + 0.1},{0.45 + e / 25}")
    hist.write_text("\n".join(rows) + "\n")
    h, w, _ = _png_ok(plot_curves(hist, tmp_path / "curves.png"))
    assert w > h  # loss and accuracy side by side
    # Without validation the val columns are empty; the plot still works.
    hist.write_text(
        "epoch,lr,train_loss,train_acc,val_loss,val_acc\n1,0.1,1.0,0.5,,\n2,0.1,0.8,0.6,,\n"
    )
    _png_ok(plot_curves(hist, tmp_path / "curves_train_only.png"))
