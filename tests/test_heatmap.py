"""Class heatmaps: the linear head as a 1x1 convolution, exact by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from tlearn.backbone.cut import FeatureNetwork
from tlearn.backbone.weights import load_backbone
from tlearn.cli.app import app
from tlearn.core.errors import UsageError
from tlearn.jobs.fit import fit
from tlearn.jobs.heatmap import ScoreMapNetwork, check_spatial, fold_linear, heatmaps, linear_map
from tlearn.jobs.predict import predict
from tlearn.modeldir import SavedModel, load_model


def _png_ok(path, min_side=200):
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 5_000
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert min(img.shape[:2]) >= min_side
    assert img.std() > 5  # not blank


@pytest.fixture(scope="module")
def svm_model(tmp_path_factory):
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("hm")
    make_dataset(root / "data")
    fit(
        root / "data",
        root / "svm",
        model="test_efficientnet",
        weights="none",
        layers="blocks.3",
        C=0.01,
    )
    return root / "svm", root / "data"


def test_svm_heatmap_mean_equals_decision_score(svm_model):
    model_dir, data = svm_model
    images = sorted(str(p) for p in data.rglob("*.*"))
    res = heatmaps(model_dir, images)
    pred = {p.path: p for p in predict(model_dir, images).predictions}
    assert res.layer == "blocks.3" and res.map_size == (10, 10)  # 160 px / 16
    assert len(res.items) == len(images) == len(pred)
    for item in res.items:
        assert item.maps.shape == (3, 10, 10)
        margins = np.asarray([pred[item.path].scores[c] for c in res.classes])
        # The map before upsampling averages to the SVM margin of every class.
        np.testing.assert_allclose(item.maps.mean(axis=(1, 2)), margins, rtol=1e-4, atol=1e-4)
        assert item.predicted == pred[item.path].label
        # labelled with the calibrated probability predict reports
        assert item.score == pytest.approx(pred[item.path].probability, abs=1e-4)
        # and the map varies over the image: it is not the pooled score broadcast.
        assert item.maps.std(axis=(1, 2)).max() > 1e-4


def test_logreg_heatmap_at_final_matches_probabilities(tmp_path, image_folder):
    fit(
        image_folder,
        tmp_path / "lr",
        head="logreg",
        model="test_efficientnet",
        weights="none",
        C=0.1,
    )
    images = sorted(str(p) for p in (image_folder / "grass").iterdir())
    res = heatmaps(tmp_path / "lr", images, class_name="asphalt")
    pred = {p.path: p for p in predict(tmp_path / "lr", images).predictions}
    assert res.layer == "final" and res.map_size == (5, 5)
    for item in res.items:
        d = item.maps.mean(axis=(1, 2))
        probs = np.exp(d - d.max()) / np.exp(d - d.max()).sum()
        expected = np.asarray([pred[item.path].scores[c] for c in res.classes])
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert item.shown == "asphalt"


def test_torch_linear_head_plugs_in_the_same_way():
    """A torch nn.Linear on avg-pooled features (the fine-tuning head) is exact too."""
    torch.manual_seed(0)
    backbone = load_backbone("test_efficientnet", "none")
    lin = torch.nn.Linear(48, 4)
    lmap = fold_linear(lin.weight.detach().numpy(), lin.bias.detach().numpy())
    net = ScoreMapNetwork(backbone.model, "blocks.3", lmap).eval()
    pooled = FeatureNetwork(backbone.model, ["blocks.3"], "avg").eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        maps = net(x)
        expected = lin(pooled(x))
    assert maps.shape == (2, 4, 10, 10)
    torch.testing.assert_close(maps.mean((2, 3)), expected, rtol=1e-5, atol=1e-5)


def test_heatmap_cli_writes_overlays(tmp_path, svm_model, runner):
    model_dir, data = svm_model
    out = tmp_path / "hm"
    images = sorted(str(p) for p in (data / "gravel").iterdir())[:2]
    r = runner.invoke(
        app, ["heatmap", str(model_dir), *images, "-o", str(out), "--class", "grass", "--json"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["layer"] == "blocks.3" and res["map_size"] == [10, 10]
    assert [h["path"] for h in res["heatmaps"]] == images
    for h in res["heatmaps"]:
        assert h["class"] == "grass" and h["prediction"] == "gravel"
        assert h["map_min"] <= h["map_mean"] <= h["map_max"]
        _png_ok(out / (h["path"].rsplit("/", 1)[1].rsplit(".", 1)[0] + ".heatmap.png"))
    r = runner.invoke(app, ["heatmap", str(model_dir), images[0], "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "gravel_00.heatmap.png" in r.stdout and "calibrated probability" in r.stdout


def test_heatmap_refusals(tmp_path, image_folder, svm_model, runner):
    model_dir, data = svm_model
    img = str(next((data / "grass").iterdir()))
    r = runner.invoke(app, ["heatmap", str(model_dir), img, "-o", str(tmp_path), "--class", "x"])
    assert r.exit_code == 2 and "--class 'x' is not in the model" in r.stderr
    for extra, message in (
        (["--layer", "blocks.2,blocks.3"], "one layer"),
        (["--layer", "blocks.3", "--pool", "max"], "--pool avg"),
    ):
        m = tmp_path / f"{extra[1].replace(',', '_')}_{extra[-1]}"
        r = runner.invoke(
            app, ["fit", str(image_folder), "-o", str(m), "-q", "--C", "0.01", *extra, *TINY]
        )
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["heatmap", str(m), img, "-o", str(tmp_path / "o")])
        assert r.exit_code == 2 and message in r.stderr, r.stderr
        assert "\n" not in r.stderr.strip()  # one line


def test_non_linear_heads_and_non_average_pooling_are_refused(svm_model):
    saved = load_model(svm_model[0])
    mlp = SavedModel(saved.path, {**saved.config, "head": {"type": "mlp"}}, saved.tensors)
    with pytest.raises(UsageError, match="head is 'mlp'.*not be exact"):
        linear_map(mlp)
    import timm

    dc = {"input_size": [3, 64, 64]}
    convnext = timm.create_model("test_convnext").eval()  # LayerNorm after its pooling
    with pytest.raises(UsageError, match="not a plain average"):
        check_spatial(convnext, "final", dc)
    assert check_spatial(convnext, "stages.3", dc) == (2, 2)
    vit = timm.create_model("test_vit").eval()
    with pytest.raises(UsageError, match="C x H x W"):
        check_spatial(vit, "blocks.1", {"input_size": list(vit.pretrained_cfg["input_size"])})
