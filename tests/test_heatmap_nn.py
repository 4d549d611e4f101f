"""Heatmaps for a trained `--head linear` (a torch nn.Linear on avg-pooled features), and
curves.png in neural-head model directories."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.conftest import TINY
from tlearn.cli.app import app
from tlearn.jobs.heatmap import heatmaps
from tlearn.jobs.predict import predict


def test_linear_nn_head_heatmap_is_exact_and_curves_are_drawn(runner, image_folder, tmp_path):
    out = tmp_path / "m"
    args = ["fit", str(image_folder), "--head", "linear", "--layer", "blocks.3", "--epochs", "2"]
    r = runner.invoke(app, [*args, "--val-split", "0.34", "-o", str(out), "-q", *TINY])
    assert r.exit_code == 0, r.output
    png = out / "curves.png"
    assert png.is_file()
    with Image.open(png) as img:
        assert img.size[0] > 200 and np.asarray(img.convert("L")).std() > 1

    images = sorted(str(p) for p in (image_folder / "grass").iterdir())
    res = heatmaps(out, images)
    pred = {p.path: p for p in predict(out, images).predictions}
    for item in res.items:
        logits = item.maps.mean(axis=(1, 2))  # the map averages to the head's logits
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        want = np.asarray([pred[item.path].scores[c] for c in res.classes])
        np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-5)
        assert item.predicted == pred[item.path].label
    # labelled the way predict reports it: the calibrated probability (temperature
    # scaling on the validation split), maps of logits (not SVM margins)
    assert (res.score_kind, res.decision_kind) == ("calibrated probability", "logit")
    for item in res.items:
        assert abs(item.score - pred[item.path].probability) < 1e-4
