"""tlearn export: one ONNX file per model (every head type, fine-tuned backbones), its
metadata, int8 quantization, `tlearn predict model.onnx` without torch, and
docs/onnx_example.py agreeing with `tlearn predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY, draw, make_dataset
from test_warm import tlearn as run_fresh

from tlearn.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
HEADS = {
    "svm": [],
    "logreg": ["--head", "logreg"],
    "linear": ["--head", "linear", "--epochs", "1"],
    "mlp": ["--head", "mlp", "--hidden", "8", "--head-bn", "--epochs", "1"],
    "finetuned": ["--head", "linear", "--freeze", "none", "--epochs", "1", "--augment", "none"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-data")
    make_dataset(root, classes=("asphalt", "grass"), n=4)
    # a photo-sized JPEG, so the JPEG draft (reduced-scale decoding) is exercised too
    draw(root / "grass" / "big.jpg", (40, 150, 40), seed=7, size=(900, 700))
    return root


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    """One fitted model directory per head kind, made on first use."""
    from typer.testing import CliRunner

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("export-models")

    def get(kind: str) -> Path:
        if kind not in made:
            out = root / kind
            args = ["fit", str(data), "-o", str(out), "-q", *HEADS[kind], *TINY]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            made[kind] = out
        return made[kind]

    return get


def _predictions(runner, model, data, key="scores") -> dict[str, tuple[str, np.ndarray]]:
    result = runner.invoke(app, ["predict", str(model), str(data), "-f", "json", "--all-scores"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    return {
        r["path"]: (r["prediction"], np.array(list(r[key].values()))) for r in doc["predictions"]
    }


def _example(onnx: Path, paths: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """docs/onnx_example.py in a fresh interpreter: only onnxruntime, numpy, Pillow."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "onnx_example.py"), str(onnx), *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = {}
    for line, path in zip(p.stdout.splitlines(), paths, strict=True):
        label, *scores = line[len(path) + 1 :].split(" ")
        out[path] = (label, np.array(list(map(float, scores))))
    return out


@pytest.mark.parametrize("kind", list(HEADS))
def test_export_reproduces_predict_for_every_head(kind, models, data, tmp_path, runner):
    model = models(kind)
    onnx = tmp_path / "model.onnx"
    result = runner.invoke(
        app, ["export", str(model), "-o", str(onnx), "--check", str(data), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    probs = kind != "svm"
    # every model here carries a calibration: its probabilities are in the graph too
    assert info["outputs"] == ["scores", "probabilities"]
    assert info["score_kind"] == ("probability" if probs else "svm margin")
    assert info["check"]["images"] == 9 and info["check"]["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(onnx))
    meta = session.get_modelmeta().custom_metadata_map
    from tlearn.modeldir import model_sha256

    assert meta["tlearn.model_sha256"] == model_sha256(model)
    assert json.loads(meta["tlearn.classes"]) == ["asphalt", "grass"]
    pre = json.loads(meta["tlearn.preprocess"])
    assert pre["crop"] == [160, 160] and pre["resize"] == [168] and pre["mean"][0] == 0.485
    assert json.loads(meta["tlearn.model"])["trained_backbone"] is (kind == "finetuned")
    assert session.get_inputs()[0].type == "tensor(uint8)"

    ref = _predictions(runner, model, data)
    # the example prints the graph's (calibrated) probabilities, as predict reports them
    ref_probs = _predictions(runner, model, data, key="probabilities")
    got_example = _example(onnx, sorted(ref))
    for got, want in ((_predictions(runner, onnx, data), ref), (got_example, ref_probs)):
        assert set(got) == set(want)
        for path, (label, scores) in want.items():
            assert got[path][0] == label, path
            np.testing.assert_allclose(got[path][1], scores, atol=1e-4, err_msg=path)


def test_int8_export_is_smaller_and_reports_agreement(models, data, tmp_path, runner):
    onnx = tmp_path / "q.onnx"
    args = ["export", str(models("logreg")), "-o", str(onnx), "--quantize", "int8"]
    result = runner.invoke(app, [*args, "--check", str(data), "--calibration", str(data)])
    assert result.exit_code == 0, result.output
    assert "int8:" in result.stdout and "top-1 agrees with fp32" in result.stdout
    result = runner.invoke(app, [*args, "--json"])  # synthetic check and calibration images
    assert result.exit_code == 0, result.output
    q = json.loads(result.stdout)["quantized"]
    assert q["kind"] == "int8" and q["images"] == 16 and 0 <= q["top1_agreement"] <= 1
    assert q["size_ratio"] < 0.8 and onnx.stat().st_size < q["fp32_size"]
    assert "calibrated on synthetic images" in result.stderr
    session = ort.InferenceSession(str(onnx))
    assert session.get_modelmeta().custom_metadata_map["tlearn.quantization"] == "int8"
    ops = {n.op_type for n in __import__("onnx").load(str(onnx)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    preds = _predictions(runner, onnx, data)
    assert len(preds) == 9


def test_static_batch_and_opset(models, data, tmp_path, runner):
    onnx = tmp_path / "static.onnx"
    args = ["export", str(models("svm")), "-o", str(onnx), "--static-batch", "--opset", "13"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "static batch" in result.stdout and "opset 13" in result.stdout
    import onnx as onnx_lib

    m = onnx_lib.load(str(onnx))
    assert m.opset_import[0].version == 13
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    ref = _predictions(runner, models("svm"), data)
    got = _predictions(runner, onnx, data)  # batches of several images, one per run
    assert {p: v[0] for p, v in got.items()} == {p: v[0] for p, v in ref.items()}


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--opset", "12"], 2, "--opset 12: use 13..20"),
        (["--opset", "21"], 2, "--opset 21: use 13..20"),
        (["--quantize", "int4"], 2, "int4"),
        (["--check", "nowhere"], 1, "nowhere does not exist"),
    ],
)
def test_export_refuses_bad_options(extra, code, message, models, tmp_path, runner):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(models("svm")), "-o", str(out), *extra])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists()


def test_export_of_a_missing_model_and_a_failed_check(models, tmp_path, runner, monkeypatch):
    result = runner.invoke(app, ["export", str(tmp_path / "none"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "does not exist" in result.output
    from tlearn.jobs.export_graph import WholeModel

    real = WholeModel.reference_scores
    monkeypatch.setattr(WholeModel, "reference_scores", lambda self, x: real(self, x) + 0.01)
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(models("svm")), "-o", str(out)])
    assert result.exit_code == 1
    assert "differ from tlearn's" in result.output and "nothing written" in result.output
    assert not out.exists()


def test_predict_onnx_is_torch_free(models, data, tmp_path, runner):
    onnx = tmp_path / "model.onnx"
    assert runner.invoke(app, ["export", str(models("logreg")), "-o", str(onnx)]).exit_code == 0
    rc, out, err, heavy = run_fresh(["predict", onnx, data, "-f", "csv"], tmp_path / "cache")
    assert rc == 0, err
    assert heavy == [], f"predict model.onnx imported {heavy}"
    assert out.splitlines()[0] == "path,prediction,score" and len(out.splitlines()) == 10


def test_predict_onnx_refuses_what_it_cannot_do(models, data, tmp_path, runner):
    onnx = tmp_path / "model.onnx"
    assert runner.invoke(app, ["export", str(models("svm")), "-o", str(onnx)]).exit_code == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    foreign = tmp_path / "foreign.onnx"
    import onnx as onnx_lib

    m = onnx_lib.load(str(onnx))
    del m.metadata_props[:]
    onnx_lib.save(m, str(foreign))
    cases = [
        ([str(onnx), str(data), "--tta", "flip"], 2, "needs a model directory"),
        ([str(bad), str(data)], 1, "not a loadable ONNX model"),
        ([str(foreign), str(data)], 1, "not a model exported by tlearn export"),
        ([str(tmp_path / "gone.onnx"), str(data)], 1, "does not exist"),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, args
    broken = tmp_path / "imgs"
    draw(broken / "ok.png", (40, 150, 40), seed=1)
    (broken / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = runner.invoke(app, ["predict", str(onnx), str(broken), "-f", "csv"])
    assert result.exit_code == 0 and "1 image(s) skipped" in result.output
    result = runner.invoke(app, ["predict", str(onnx), str(broken), "--strict"])
    assert result.exit_code == 3


@pytest.mark.parametrize(
    "key, value",
    [
        ("tlearn.classes", '["only one"]'),
        ("tlearn.preprocess", '{"resize": [0], "crop": [160, 160], "interpolation": "bicubic"}'),
        ("tlearn.score_kind", "logits"),
        ("tlearn.format", "tlearn-onnx/99"),
    ],
)
def test_predict_onnx_validates_the_metadata(key, value, models, data, tmp_path, runner):
    import onnx as onnx_lib

    onnx = tmp_path / "model.onnx"
    assert runner.invoke(app, ["export", str(models("svm")), "-o", str(onnx)]).exit_code == 0
    m = onnx_lib.load(str(onnx))
    for prop in m.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx_lib.save(m, str(onnx))
    result = runner.invoke(app, ["predict", str(onnx), str(data)])
    assert result.exit_code == 1, result.output
    assert str(onnx) in result.output and "export it again" in result.output


@pytest.mark.parametrize("kind", ["svm", "logreg"])
def test_exported_probabilities_are_the_calibrated_ones(kind, models):
    """The graph's `probabilities` are softmax(decision / T), what predict reports."""
    from tlearn.heads.linear import LinearHead
    from tlearn.jobs.export_graph import model_scoring
    from tlearn.modeldir import load_model

    saved = load_model(models(kind))
    scoring = model_scoring(saved)
    feats = np.random.default_rng(0).normal(size=(5, int(saved.config["feature_dim"])))
    feats = feats.astype(np.float32)
    with torch.inference_mode():
        scores, probs = scoring.module(torch.from_numpy(feats))
    head = LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)
    want = saved.posthoc.probabilities(head.decision_function(feats))
    np.testing.assert_allclose(probs.numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), head.scores(feats), rtol=1e-4, atol=1e-5)
