"""tlearn sweep and fit --layer auto: one forward pass, CV per layer, best single and pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import tlearn.runtime.export as rt
from tests.conftest import TINY, make_dataset
from tlearn.backbone.cut import FeatureNetwork
from tlearn.backbone.layers import Candidate, candidate_layers, list_layers
from tlearn.backbone.weights import load_backbone
from tlearn.cli.app import app
from tlearn.jobs.sweep import LayerFeatures, extract_layers, sweep, sweep_features

FAST = ["--C", "0.01", "--folds", "3"]


def _png_ok(path, min_side=200):
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 5_000
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert min(img.shape[:2]) >= min_side
    assert img.std() > 5  # not blank


def test_candidates_stages_all_and_explicit():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    infos = list_layers(model)
    stages = [c.name for c in candidate_layers(model, "stages", infos)]
    assert stages == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "final"]
    every = candidate_layers(model, "all", infos)
    assert [c.name for c in every] == [f"blocks.{i}" for i in range(7)] + ["final"]
    by = {c.name: c for c in every}
    assert by["blocks.5"].shape == (192, 7, 7) and by["blocks.5"].stage is None
    # Cumulative cost grows with depth; final costs the whole feature extractor.
    flops = [c.gflops for c in every]
    assert flops == sorted(flops) and by["final"].gflops == infos[-1].gflops
    explicit = candidate_layers(model, "final,blocks.3,-1", infos)
    assert [c.name for c in explicit] == ["blocks.3", "blocks.6", "final"]


def test_extract_layers_matches_single_layer_extraction(image_folder):
    torch.manual_seed(0)
    backbone = load_backbone("test_efficientnet", "none")
    paths = sorted(str(p) for p in image_folder.rglob("*.*"))[:5]
    feats = extract_layers(backbone, ["blocks.1", "blocks.3", "final"], "avg", paths)
    assert feats.dims == (24, 48, 256) and feats.X.shape == (5, 24 + 48 + 256)
    from tlearn.features.stream import extract_array
    from tlearn.runtime.torch_runtime import TorchRuntime

    for layer in ("blocks.3", "final"):
        net = FeatureNetwork(backbone.model, [layer], "avg").eval()
        cpu = TorchRuntime(net, torch.device("cpu"))
        alone = extract_array(cpu, paths, backbone.data_config).X
        np.testing.assert_allclose(feats.select([layer]), alone, rtol=1e-5, atol=1e-5)


def _synthetic(n=60, seed=0):
    """Three layers: `mid` separates the classes, `early` and `late` are noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    early = rng.normal(size=(n, 4))
    mid = rng.normal(size=(n, 6)) + 3.0 * y[:, None]
    late = rng.normal(size=(n, 8))
    cands = [
        Candidate("early", (4, 8, 8), 10, 0.1),
        Candidate("mid", (6, 4, 4), 20, 0.2),
        Candidate("late", (8, 2, 2), 30, 0.3),
    ]
    feats = LayerFeatures(
        ("early", "mid", "late"),
        (4, 6, 8),
        np.arange(n),
        np.hstack([early, mid, late]).astype(np.float32),
    )
    return feats, y, cands


def test_sweep_features_picks_the_informative_layer_and_scores_pairs():
    feats, y, cands = _synthetic()
    rows, pairs, best, best_pair = sweep_features(feats, y, ["a", "b"], cands, C=0.1, folds=3)
    assert [r.name for r in rows] == ["early", "mid", "late"]
    assert best.name == "mid" and best.cv_mean > 0.9
    assert {r.name for r in rows if r.name != "mid"} == {"early", "late"}
    assert all(r.cv_mean < 0.8 for r in rows if r.name != "mid")
    # Pairs among the best (all three here), layers in depth order, cost of the deeper one.
    assert sorted(p.name for p in pairs) == ["early,late", "early,mid", "mid,late"]
    assert "mid" in best_pair.layers
    assert next(p for p in pairs if p.name == "mid,late").gflops == 0.3


def test_ties_go_to_the_cheaper_layer():
    feats, y, cands = _synthetic()
    # `late` made as separable as `mid`: both score 1.0; mid is cheaper.
    feats.X[:, 10:] += 5.0 * y[:, None]
    rows, _, best, _ = sweep_features(feats, y, ["a", "b"], cands, C=0.1, folds=3, pairs=False)
    scores = {r.name: r.cv_mean for r in rows}
    assert scores["mid"] == scores["late"] == 1.0
    assert best.name == "mid"


def test_sweep_with_c_search_reports_the_chosen_c(image_folder):
    res = sweep(
        image_folder,
        model="test_efficientnet",
        weights="none",
        layers="blocks.2,final",
        folds=3,
        pairs=False,
    )
    assert res.C is None and "searched" in res.method
    for r in res.rows:
        assert r.C in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
        assert 0 <= r.cv_mean <= 1 and r.fit_seconds >= 0


def test_sweep_cli_table_json_and_plot(tmp_path, image_folder, runner):
    out = tmp_path / "sw"
    r = runner.invoke(app, ["sweep", str(image_folder), "-o", str(out), "-q", *FAST, *TINY])
    assert r.exit_code == 0, r.output
    assert "recommended cut: --layer" in r.stdout and "best pair: --layer" in r.stdout
    for layer in ("blocks.0", "blocks.4", "final"):
        assert layer in r.stdout
    data = json.loads((out / "sweep.json").read_text())
    assert [row["layer"] for row in data["layers"]] == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "blocks.4",
        "final",
    ]
    best = max(data["layers"], key=lambda row: row["cv_accuracy"])
    assert data["recommended"]["cv_accuracy"] == best["cv_accuracy"]
    assert data["n_images"] == 18 and data["C"] == 0.01 and data["folds"] == 3
    assert len(data["pairs"]) == 6 and data["best_pair"]["layer"].count(",") == 1
    _png_ok(out / "sweep.png")

    r = runner.invoke(
        app,
        [
            "sweep",
            str(image_folder),
            "--json",
            "--no-pairs",
            "-q",
            "--layers",
            "blocks.2,blocks.4",
            *FAST,
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [row["feature_dim"] for row in data["layers"]] == [32, 64]
    assert data["pairs"] == [] and data["best_pair"] is None


def test_sweep_uses_only_the_train_part(split_folder, runner):
    r = runner.invoke(app, ["sweep", str(split_folder), "--json", "--no-pairs", *FAST, *TINY])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == 18  # train/ has 18, val/ has 9
    assert "val/ images are never used" in r.stderr


def test_sweep_errors(tmp_path, image_folder, runner):
    r = runner.invoke(app, ["sweep", str(image_folder), "--layers", "blocks.9", *TINY])
    assert r.exit_code == 2 and "unknown layer 'blocks.9'" in r.stderr
    tiny = tmp_path / "tiny"
    make_dataset(tiny, n=1)
    r = runner.invoke(app, ["sweep", str(tiny), *FAST, *TINY])
    assert r.exit_code == 1 and "at least 2 per class" in r.stderr


def test_fit_layer_auto_records_the_sweep(tmp_path, split_folder, runner):
    out = tmp_path / "auto"
    r = runner.invoke(
        app,
        [
            "fit",
            str(split_folder),
            "-o",
            str(out),
            "--layer",
            "auto",
            "--C",
            "0.01",
            "--json",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    config = json.loads((out / "config.json").read_text())
    table = json.loads((out / "sweep.json").read_text())
    chosen = config["layer_auto"]["chosen"]
    assert config["cut"]["layers"] == chosen == res["layers"] == table["recommended"]["layers"]
    assert table["n_images"] == 18  # the sweep saw the training images only
    assert config["feature_dim"] == table["recommended"]["feature_dim"]
    assert res["n_val"] == 9 and res["validation"]["accuracy"] is not None
    r = runner.invoke(app, ["predict", str(out), str(split_folder / "val"), "-f", "json", "-q"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["predictions"]) == 9


def test_fit_layer_auto_with_val_split_and_refusing_a_features_csv(tmp_path, image_folder, runner):
    out = tmp_path / "auto"
    r = runner.invoke(
        app,
        [
            "fit",
            str(image_folder),
            "-o",
            str(out),
            "--layer",
            "auto",
            "--val-split",
            "0.34",
            "--C",
            "0.01",
            "--json",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "sweep.json").read_text())["n_images"] == 11  # 18 minus 7 held out
    csv_path = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(csv_path), "-q", *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["fit", str(csv_path), "-o", str(tmp_path / "x"), "--layer", "auto", *TINY]
    )
    assert r.exit_code == 2 and "needs image folders" in r.stderr


@pytest.mark.parametrize("kind", ["logreg"])
def test_sweep_logreg_head(image_folder, kind):
    res = sweep(
        image_folder,
        model="test_efficientnet",
        weights="none",
        layers="blocks.4",
        head=kind,
        C=0.1,
        folds=3,
    )
    assert res.head == "logreg" and "LogisticRegression" in res.method
    assert res.best.name == "blocks.4" and res.best_pair is None


def test_second_sweep_comes_from_the_feature_cache(runner, image_folder, tmp_path, monkeypatch):

    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["sweep", str(image_folder), "--json", "--no-pairs", "--C", "0.01", *TINY]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output

    def refuse(*a, **k):
        raise AssertionError("the backbone ran although every image was cached")

    monkeypatch.setattr(rt, "open_runtime", refuse)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert [r["cv_accuracy"] for r in a["layers"]] == [r["cv_accuracy"] for r in b["layers"]]
