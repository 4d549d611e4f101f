"""Several cut points joined by commas: pooled features concatenated, in extract and fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from tlearn.backbone.cut import FeatureNetwork
from tlearn.backbone.layers import resolve_layers
from tlearn.backbone.weights import load_backbone
from tlearn.cli.app import app


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("test_efficientnet", "none")


def test_several_layers_concatenate_pooled_features_in_order(tiny):
    x = torch.randn(2, 3, 64, 64)
    single = {
        n: FeatureNetwork(tiny.model, [n], "avg").eval()(x)
        for n in ("blocks.2", "blocks.4", "final")
    }
    with torch.inference_mode():
        both = FeatureNetwork(tiny.model, ["blocks.2", "blocks.4"], "avg").eval()(x)
        with_final = FeatureNetwork(tiny.model, ["blocks.2", "final"], "avg").eval()(x)
    assert both.shape == (2, 32 + 64)
    torch.testing.assert_close(both, torch.cat([single["blocks.2"], single["blocks.4"]], 1))
    # `final` with another layer goes through forward hooks, not the FX graph.
    assert with_final.shape == (2, 32 + 256)
    torch.testing.assert_close(
        with_final, torch.cat([single["blocks.2"], single["final"]], 1), rtol=1e-5, atol=1e-5
    )


def test_resolve_layers_accepts_names_and_stage_indices(tiny):
    assert resolve_layers(tiny.model, "blocks.2,-1") == ("blocks.2", "blocks.4")
    assert resolve_layers(tiny.model, "blocks.1, final") == ("blocks.1", "final")


def test_extract_and_fit_with_two_layers(tmp_path, image_folder, runner):
    csv_path = tmp_path / "f.csv"
    r = runner.invoke(
        app,
        ["extract", str(image_folder), "-o", str(csv_path), "-q", "--layer", "blocks.2,blocks.4"]
        + TINY,
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "f.csv.json").read_text())
    assert meta["cut"]["layers"] == ["blocks.2", "blocks.4"]
    assert meta["feature_dim"] == 96
    header = csv_path.read_text().splitlines()[0].split(",")
    assert len(header) == 2 + 96

    model_dir = tmp_path / "m"
    r = runner.invoke(
        app,
        ["fit", str(image_folder), "-o", str(model_dir), "-q", "--C", "0.01", "-l", "2,final"]
        + TINY,
    )
    assert r.exit_code == 0, r.output
    config = json.loads((model_dir / "config.json").read_text())
    assert config["cut"]["layers"] == ["blocks.2", "final"]
    assert config["feature_dim"] == 32 + 256
    r = runner.invoke(app, ["predict", str(model_dir), str(image_folder), "-f", "jsonl", "-q"])
    assert r.exit_code == 0, r.output
    preds = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(preds) == 18
    truth = [p["path"].split("/")[-2] for p in preds]
    assert np.mean([p["prediction"] == t for p, t in zip(preds, truth, strict=True)]) > 0.8
