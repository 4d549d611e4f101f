"""End-to-end CLI tests of the linear-SVM path: extract, fit, predict, evaluate."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from tests.conftest import TINY, draw, make_dataset
from tlearn.cli.app import app


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


# ----------------------------------------------------------------------------- basics


def test_version(runner):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.startswith("tlearn ")


def test_python_dash_m_works():
    r = subprocess.run(
        [sys.executable, "-m", "tlearn", "--version"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "tlearn" in r.stdout


@pytest.mark.parametrize("command", ["models", "layers", "extract", "fit", "predict", "evaluate"])
def test_every_command_has_help_with_example(runner, command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0
    assert "Example" in r.stdout


# ----------------------------------------------------------------------------- extract


def test_extract_writes_csv_with_labels_and_sidecar(runner, image_folder, tmp_path):
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "-q", *TINY])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert list(df.columns[:3]) == ["path", "label", "f0"]
    assert len(df) == 18
    assert sorted(df["label"].unique()) == ["asphalt", "grass", "gravel"]
    # the default cut is the model's pooled penultimate features: 256-d for test_efficientnet
    assert df.shape[1] == 2 + 256
    meta = json.loads((tmp_path / "f.csv.json").read_text())
    assert meta["cut"]["model"] == "test_efficientnet"
    assert meta["cut"]["layers"] == ["final"]
    assert meta["cut"]["pool"] == "avg"
    assert meta["cut"]["weights_source"] == "none"
    assert meta["data_config"]["input_size"] == [3, 160, 160]
    assert {"tlearn", "timm", "torch"} <= set(meta["versions"])
    assert meta["rows"] == 18


@pytest.mark.parametrize(
    "layer, pool, dim",
    [
        ("blocks.2", "avg", 32),
        ("blocks.2", "catavgmax", 64),
        ("blocks.2", "max", 32),
        ("-1", "avg", 64),  # last feature_info stage = blocks.4 (64 channels)
        ("blocks.1,blocks.3", "avg", 24 + 48),
        ("blocks.4", "flatten", 64 * 5 * 5),
    ],
)
def test_extract_cut_and_pool_dimensions(runner, image_folder, tmp_path, layer, pool, dim):
    out = tmp_path / "f.csv"
    r = runner.invoke(
        app,
        ["extract", str(image_folder), "-o", str(out), "--layer", layer, "--pool", pool, "-q"]
        + TINY,
    )
    assert r.exit_code == 0, r.output
    header = out.read_text().splitlines()[0].split(",")
    assert len(header) - 2 == dim


def test_extract_to_stdout(runner, image_folder):
    r = runner.invoke(app, ["extract", str(image_folder / "grass"), "-o", "-", "-q", *TINY])
    assert r.exit_code == 0, r.output
    rows = _csv_rows(r.stdout)
    assert len(rows) == 6
    assert all(row["label"] == "" for row in rows)  # a plain folder has no labels


def test_extract_quotes_awkward_paths(runner, tmp_path):
    names = ['straße, "q"; #1.jpg', "with space.png", "日本語.png"]
    root = tmp_path / "odd"
    for i, name in enumerate(names):
        draw(root / "cls" / name, (100, 50, 20), seed=i)
        draw(root / "other" / name, (20, 50, 100), seed=10 + i)
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(root), "-o", str(out), "-q", *TINY])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert sorted(p.split("/")[-1] for p in df["path"]) == sorted(names * 2)


def test_extract_features_are_float32_exact(runner, image_folder, tmp_path):
    """The CSV holds the exact float32 values (shortest round-trip text)."""
    import torch

    from tlearn.backbone.cut import feature_network
    from tlearn.backbone.weights import open_backbone
    from tlearn.features.stream import extract_array
    from tlearn.runtime.torch_runtime import TorchRuntime

    out = tmp_path / "f.csv"
    # Same backend as extract_array's default, and no cached features from another backend
    # (ONNX Runtime agrees with torch within 1e-4, not bit for bit).
    args = ["-o", str(out), "-q", "--backend", "torch", "--no-cache", *TINY]
    r = runner.invoke(app, ["extract", str(image_folder / "gravel"), *args])
    assert r.exit_code == 0
    df = pd.read_csv(out, dtype={f"f{i}": np.float32 for i in range(256)})
    backbone = open_backbone("test_efficientnet", "none")
    net, _ = feature_network(backbone, None, "avg")
    cpu = TorchRuntime(net, torch.device("cpu"))
    feats = extract_array(cpu, list(df["path"]), backbone.data_config, workers=0)
    np.testing.assert_array_equal(df.iloc[:, 2:].to_numpy(np.float32), feats.X)


def test_only_layers_up_to_the_cut_are_computed(image_folder):
    import torch

    from tlearn.backbone.cut import feature_network
    from tlearn.backbone.weights import open_backbone

    backbone = open_backbone("test_efficientnet", "none")
    net, spec = feature_network(backbone, "blocks.2", "avg")
    ran = []
    backbone.model.conv_head.register_forward_hook(lambda *a: ran.append("conv_head"))
    backbone.model.blocks[3].register_forward_hook(lambda *a: ran.append("blocks.3"))
    with torch.inference_mode():
        net(torch.zeros(2, 3, 64, 64))
    assert ran == []
    net, _ = feature_network(backbone, None, "avg")
    with torch.inference_mode():
        net(torch.zeros(2, 3, 64, 64))
    assert "conv_head" in ran


def test_broken_image_is_skipped_not_replaced(runner, image_folder, tmp_path):
    bad = image_folder / "grass" / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), *TINY])
    assert r.exit_code == 0, r.output
    assert "broken.jpg" in r.stderr
    assert "1 image(s) skipped" in r.stderr
    df = pd.read_csv(out)
    assert len(df) == 18
    assert not any(p.endswith("broken.jpg") for p in df["path"])
    assert df["path"].is_unique


# ----------------------------------------------------------------------------- layers / models


def test_layers_json_matches_conv_arithmetic(runner):
    r = runner.invoke(app, ["layers", "test_efficientnet", "--input-size", "64", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    layers = {li["name"]: li for li in info["layers"]}
    # conv_stem: 3x3, stride 2, padding 1: (64 - 3 + 2*1)/2 + 1 = 32; F*F*C*D params (no bias)
    assert layers["conv_stem"]["shape"] == [24, 32, 32]
    assert layers["conv_stem"]["params"] == 3 * 3 * 3 * 24
    assert layers["conv_stem"]["reduction"] == 2
    assert layers["blocks.4"]["shape"] == [64, 2, 2]
    assert layers["blocks.4"]["stage"] == 4
    params = [li["params"] for li in info["layers"]]
    assert params == sorted(params)  # cumulative
    assert layers["bn2"]["gflops"] > layers["blocks.2"]["gflops"] > 0


def test_layers_table(runner):
    r = runner.invoke(app, ["layers", "test_resnet"])
    assert r.exit_code == 0, r.output
    assert "layer1" in r.stdout and "stage" in r.stdout


def test_models_marks_bundled_weights(runner):
    r = runner.invoke(app, ["models", "tf_efficientnet_lite", "--json"])
    assert r.exit_code == 0, r.output
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["tf_efficientnet_lite0"]["offline"] is True
    assert rows["tf_efficientnet_lite0"]["bundled"] is True
    assert "tf_efficientnet_lite4" in rows


# ----------------------------------------------------------------------------- fit


def test_fit_writes_model_directory(runner, fitted_model):
    files = sorted(p.name for p in fitted_model.iterdir())
    assert files == [
        "calibration.safetensors",
        "config.json",
        "head.safetensors",
        "metrics.json",
        "skipped.csv",
    ]
    cfg = json.loads((fitted_model / "config.json").read_text())
    assert cfg["classes"] == ["asphalt", "grass", "gravel"]
    assert cfg["head"]["type"] == "svm"
    assert cfg["head"]["C_requested"] == "auto"
    assert cfg["head"]["cv"], "C auto must record the cross-validation scores"
    assert cfg["cut"]["weights_sha256"]
    assert cfg["data_config"]["interpolation"] == "bicubic"
    tensors = load_file(str(fitted_model / "head.safetensors"))
    assert tensors["coef"].shape == (3, 256)
    assert tensors["scaler_mean"].shape == (256,)


def test_fit_refuses_to_overwrite_without_force(runner, fitted_model, image_folder):
    before = (fitted_model / "config.json").read_text()
    r = runner.invoke(app, ["fit", str(image_folder), "-o", str(fitted_model), *TINY])
    assert r.exit_code == 1
    assert "--force" in r.stderr
    assert (fitted_model / "config.json").read_text() == before
    r = runner.invoke(
        app,
        ["fit", str(image_folder), "-o", str(fitted_model), "--force", "--C", "0.1", "-q"] + TINY,
    )
    assert r.exit_code == 0, r.output
    assert json.loads((fitted_model / "config.json").read_text())["head"]["C"] == 0.1


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_fit_with_train_val_layout_reports_validation(runner, split_folder, tmp_path, head):
    out = tmp_path / "m"
    r = runner.invoke(
        app, ["fit", str(split_folder), "-o", str(out), "--head", head, "--json", "-q"] + TINY
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_train"] == 18 and res["n_val"] == 9
    assert res["validation"]["accuracy"] >= 0.66
    assert set(res["validation"]["per_class"]) == {"asphalt", "grass", "gravel"}


def test_fit_val_split_and_table(runner, image_folder, tmp_path):
    r = runner.invoke(
        app, ["fit", str(image_folder), "-o", str(tmp_path / "m"), "--val-split", "0.34"] + TINY
    )
    assert r.exit_code == 0, r.output
    assert "validation accuracy" in r.stdout
    assert "precision" in r.stdout


def test_fit_from_features_csv_matches_fit_from_images(runner, image_folder, tmp_path):
    csv_path = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(csv_path), "-q", *TINY])
    assert r.exit_code == 0
    a, b = tmp_path / "from_csv", tmp_path / "from_images"
    assert (
        runner.invoke(app, ["fit", str(csv_path), "-o", str(a), "-q", "--C", "0.01"]).exit_code == 0
    )
    r = runner.invoke(app, ["fit", str(image_folder), "-o", str(b), "-q", "--C", "0.01", *TINY])
    assert r.exit_code == 0
    ta, tb = load_file(str(a / "head.safetensors")), load_file(str(b / "head.safetensors"))
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    # a model fitted from CSV still predicts images (the sidecar recorded the backbone)
    r = runner.invoke(app, ["predict", str(a), str(image_folder / "gravel"), "-f", "jsonl"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 6


def test_fit_with_labels_csv(runner, image_folder, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = ["path,label"]
    for cls in ("asphalt", "gravel"):
        for p in sorted((image_folder / cls).iterdir()):
            rows.append(f"{p},{cls}")
    labels.write_text("\n".join(rows) + "\n")
    r = runner.invoke(
        app, ["fit", str(tmp_path), "--labels", str(labels), "-o", str(tmp_path / "m"), "-q"] + TINY
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["classes"] == ["asphalt", "gravel"]


# ----------------------------------------------------------------------------- predict / evaluate


def test_predict_formats(runner, fitted_model, image_folder, tmp_path):
    target = str(image_folder / "gravel")
    r = runner.invoke(app, ["predict", str(fitted_model), target])
    assert r.exit_code == 0, r.output
    rows = _csv_rows(r.stdout)  # csv when piped
    # calibrated probability and the out-of-distribution columns (issue 16) follow the score
    assert [k for k in rows[0]] == [
        "path",
        "prediction",
        "score",
        "probability",
        "ood_score",
        "unknown",
    ]
    assert len(rows) == 6
    assert sum(row["prediction"] == "gravel" for row in rows) >= 5

    r = runner.invoke(app, ["predict", str(fitted_model), target, "-f", "json", "--top-k", "2"])
    data = json.loads(r.stdout)
    assert data["score"] == "svm margin"
    assert len(data["predictions"][0]["top_k"]) == 2

    r = runner.invoke(app, ["predict", str(fitted_model), target, "-f", "jsonl", "--all-scores"])
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert set(recs[0]["scores"]) == {"asphalt", "grass", "gravel"}
    assert recs[0]["prediction"] == max(recs[0]["scores"], key=recs[0]["scores"].get)

    r = runner.invoke(app, ["predict", str(fitted_model), target, "-f", "table"])
    assert "prediction" in r.stdout and "gravel" in r.stdout

    out = tmp_path / "preds.csv"
    r = runner.invoke(app, ["predict", str(fitted_model), target, "-o", str(out), "--top-k", "3"])
    assert r.exit_code == 0
    assert _csv_rows(out.read_text())[0].keys() >= {"top2", "top3_score"}


def test_predict_single_files_and_logreg_probabilities(runner, image_folder, tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(
        app, ["fit", str(image_folder), "-o", str(out), "--head", "logreg", "-q", *TINY]
    )
    assert r.exit_code == 0, r.output
    files = sorted(str(p) for p in (image_folder / "asphalt").iterdir())[:2]
    r = runner.invoke(app, ["predict", str(out), *files, "-f", "jsonl", "--all-scores"])
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["path"] for rec in recs] == files
    for rec in recs:
        assert abs(sum(rec["scores"].values()) - 1) < 1e-5


def test_evaluate_json_and_reports(runner, fitted_model, image_folder, tmp_path):
    r = runner.invoke(
        app,
        ["evaluate", str(fitted_model), str(image_folder), "--json", "-o", str(tmp_path / "rep")],
    )
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert 0.9 <= m["accuracy"] <= 1.0
    assert {"balanced_accuracy", "per_class", "confusion"} <= set(m)
    assert sum(map(sum, m["confusion"]["matrix"])) == 18
    assert (tmp_path / "rep" / "metrics.json").is_file()
    conf = (tmp_path / "rep" / "confusion.csv").read_text().splitlines()
    assert conf[0].split(",")[1:] == ["asphalt", "grass", "gravel"]

    r = runner.invoke(app, ["evaluate", str(fitted_model), str(image_folder)])
    assert r.exit_code == 0
    assert "confusion" in r.stdout and "accuracy" in r.stdout


def test_predict_reproduces_fit_preprocessing(runner, fitted_model, image_folder, tmp_path):
    """Evaluate on the training images gives the same predictions as the head on the
    features fit saw: the data config saved with the model is used, not a fresh one."""
    cfg = json.loads((fitted_model / "config.json").read_text())
    cfg["data_config"]["crop_pct"] = 0.5  # an edited config must change what predict sees
    (fitted_model / "config.json").write_text(json.dumps(cfg))
    r1 = runner.invoke(
        app,
        ["predict", str(fitted_model), str(image_folder / "grass"), "-f", "json", "--all-scores"],
    )
    cfg["data_config"]["crop_pct"] = 0.95
    (fitted_model / "config.json").write_text(json.dumps(cfg))
    r2 = runner.invoke(
        app,
        ["predict", str(fitted_model), str(image_folder / "grass"), "-f", "json", "--all-scores"],
    )
    s1 = json.loads(r1.stdout)["predictions"][0]["scores"]
    s2 = json.loads(r2.stdout)["predictions"][0]["scores"]
    assert s1 != s2


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["fit", "{missing}", "-o", "{tmp}/m"], 1, "not a folder"),
        (["fit", "{data}", "-o", "{tmp}/m", "--C", "zero"], 2, "--C"),
        (["fit", "{data}", "-o", "{tmp}/m", "--C", "-1"], 2, "positive"),
        (["fit", "{data}", "-o", "{tmp}/m", "--val-split", "1.5"], 2, "--val-split"),
        (["fit", "{data}", "-o", "{tmp}/m", "--head", "forest"], 2, "forest"),
        (["fit", "{data}", "-o", "{tmp}/m", "--layer", "blocks.99"], 2, "unknown layer"),
        (["fit", "{data}", "-o", "{tmp}/m", "--layer", "blocks.2x"], 2, "did you mean"),
        (["fit", "{data}", "-o", "{tmp}/m", "--layer", "7"], 2, "stage index"),
        (["extract", "{data}", "-o", "{tmp}/f.csv", "--model", "resnet_18"], 1, "did you mean"),
        (["extract", "{data}", "-o", "{tmp}/f.csv", "--weights", "{tmp}/nope.pth"], 1, "--weights"),
        (["extract", "{data}", "-o", "{tmp}/f.csv", "--device", "tpu"], 1, "--device"),
        (["predict", "{tmp}/no-model", "{data}"], 1, "does not exist"),
        (["evaluate", "{tmp}/no-model", "{data}"], 1, "does not exist"),
        (["layers", "not_a_model"], 1, "unknown model"),
    ],
)
def test_errors_are_one_line_with_exit_code(runner, image_folder, tmp_path, args, code, message):
    fill = {"data": str(image_folder), "tmp": str(tmp_path), "missing": str(tmp_path / "nope")}
    argv = [a.format(**fill) for a in args]
    if argv[0] in ("fit", "extract"):
        argv += ["--weights", "none"] if "--weights" not in argv else []
        argv += ["--model", "test_efficientnet"] if "--model" not in argv else []
    r = runner.invoke(app, argv)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert message in r.stderr
    assert "Traceback" not in r.output
    if code == 1:
        assert len(r.stderr.strip().splitlines()) == 1


def test_fit_needs_two_classes(runner, tmp_path):
    make_dataset(tmp_path / "one", classes=("grass",), n=4)
    r = runner.invoke(app, ["fit", str(tmp_path / "one"), "-o", str(tmp_path / "m"), *TINY])
    assert r.exit_code == 1
    assert "two classes" in r.stderr


def test_evaluate_unknown_class_is_an_error(runner, fitted_model, tmp_path):
    make_dataset(tmp_path / "ev", classes=("sky",), n=2)
    r = runner.invoke(app, ["evaluate", str(fitted_model), str(tmp_path / "ev")])
    assert r.exit_code == 1
    assert "sky" in r.stderr


def test_predict_with_no_images(runner, fitted_model, tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["predict", str(fitted_model), str(tmp_path / "empty")])
    assert r.exit_code == 1
    assert "no" in r.stderr.lower()


COMMANDS = [
    ["models"],
    ["layers"],
    ["extract"],
    ["fit"],
    ["predict"],
    ["evaluate"],
    ["sweep"],
    ["heatmap"],
    ["merge"],
    ["audit"],
    ["export"],
    ["cache", "info"],
    ["cache", "clear"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_reads_well_at_80_columns(command):
    """No `<bool>` after on/off flags, and every example fits on one line of an 80-column
    terminal (a wrapped command line cannot be copied)."""
    import inspect

    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output
    lines = [ln.strip(" │") for ln in r.output.splitlines()]
    group = (
        app
        if len(command) == 1
        else next(g.typer_instance for g in app.registered_groups if g.name == command[0])
    )
    fn = next(c.callback for c in group.registered_commands if c.name == command[-1])
    for doc_line in inspect.getdoc(fn).splitlines():
        if doc_line.startswith(("Example:", "torchrun")):
            assert doc_line.strip() in lines, doc_line
