"""Hostile or damaged model directories: every number in config.json and every tensor is
checked, and a bad one gives exit 1 with one line naming the file and the field (never a
traceback, never NaN predictions with exit 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_dataset
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from tlearn.cli.app import app


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An svm model and an mlp-with-batch-norm model, fitted once for the module."""
    root = tmp_path_factory.mktemp("hostile")
    make_dataset(root / "data", n=4)
    runner = CliRunner()
    out = {"svm": root / "svm", "mlp": root / "mlp"}
    nn = ["--head", "mlp", "--hidden", "8", "--head-bn", "--epochs", "1"]
    for kind, extra in (("svm", []), ("mlp", nn)):
        r = runner.invoke(
            app, ["fit", str(root / "data"), "-o", str(out[kind]), "-q", *TINY, *extra]
        )
        assert r.exit_code == 0, r.output
    out["data"] = root / "data"
    return out


def _copy(models, kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(models[kind], dst)
    return dst


def _config(fn):
    def damage(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text())
        fn(cfg)
        (model / "config.json").write_text(json.dumps(cfg))

    return damage


def _tensor(name: str, fn):
    def damage(model: Path) -> None:
        t = load_file(str(model / "head.safetensors"))
        t[name] = fn(t[name])
        save_file(t, str(model / "head.safetensors"))

    return damage


def _dc(**kw):
    return _config(lambda c: c["data_config"].update(kw))


CONFIG_DAMAGE = {
    "std zero": (_dc(std=[0, 0, 0]), "data_config.std"),
    "std negative": (_dc(std=[-0.2, 0.2, 0.2]), "data_config.std"),
    "std strings": (_dc(std=["a", "b", "c"]), "data_config.std"),
    "std short": (_dc(std=[0.2]), "data_config.std"),
    "mean nan": (_dc(mean=[float("nan"), 0.4, 0.4]), "data_config.mean"),
    "mean inf": (_dc(mean=[float("inf"), 0.4, 0.4]), "data_config.mean"),
    "input 1e9": (_dc(input_size=[3, 10**9, 10**9]), "data_config.input_size"),
    "input tiny": (_dc(input_size=[3, 1, 1]), "data_config.input_size"),
    "input floats": (_dc(input_size=[3, 32.5, 32]), "data_config.input_size"),
    "input string": (_dc(input_size="224"), "data_config.input_size"),
    "input 7 channels": (_dc(input_size=[7, 32, 32]), "data_config.input_size"),
    "crop negative": (_dc(crop_pct=-0.5), "data_config.crop_pct"),
    "crop zero": (_dc(crop_pct=0), "data_config.crop_pct"),
    "crop tiny": (_dc(crop_pct=1e-9), "data_config.crop_pct"),
    "crop above 1": (_dc(crop_pct=3), "data_config.crop_pct"),
    "crop string": (_dc(crop_pct="0.9"), "data_config.crop_pct"),
    "crop mode": (_dc(crop_mode=["x"]), "data_config.crop_mode"),
    "interpolation": (_dc(interpolation={"a": 1}), "data_config.interpolation"),
    "data_config list": (_config(lambda c: c.update(data_config=[1])), "data_config"),
    "data_config missing std": (_config(lambda c: c["data_config"].pop("std")), "'std'"),
    "feature_dim string": (_config(lambda c: c.update(feature_dim="8")), "feature_dim"),
    "feature_dim bool": (_config(lambda c: c.update(feature_dim=True)), "feature_dim"),
    "feature_dim negative": (_config(lambda c: c.update(feature_dim=-3)), "feature_dim"),
    "classes empty name": (_config(lambda c: c["classes"].__setitem__(0, "")), "classes"),
    "classes duplicate": (
        _config(lambda c: c["classes"].__setitem__(0, c["classes"][1])),
        "classes",
    ),
    "classes numbers": (_config(lambda c: c.update(classes=[1, 2, 3])), "classes"),
    "classes dict": (_config(lambda c: c.update(classes={"a": 1})), "classes"),
    "head type list": (_config(lambda c: c["head"].update(type=[1])), "head"),
    "head string": (_config(lambda c: c.update(head="svm")), "head"),
    "head C string": (_config(lambda c: c["head"].update(C="big")), "head.C"),
    "head C negative": (_config(lambda c: c["head"].update(C=-1)), "head.C"),
    "head seed string": (_config(lambda c: c["head"].update(seed="x")), "head.seed"),
    "cut string": (_config(lambda c: c.update(cut="x")), "cut"),
    "cut layers int": (_config(lambda c: c["cut"].update(layers=5)), "cut.layers"),
    "cut layers empty": (_config(lambda c: c["cut"].update(layers=[])), "cut.layers"),
    "cut pool": (_config(lambda c: c["cut"].update(pool="evil")), "cut.pool"),
    "cut pool list": (_config(lambda c: c["cut"].update(pool=["avg"])), "cut.pool"),
    "cut model": (_config(lambda c: c["cut"].update(model=None)), "cut.model"),
    "format_version bool": (_config(lambda c: c.update(format_version=True)), "format_version"),
    "format_version string": (_config(lambda c: c.update(format_version="1")), "format_version"),
    "config list": (lambda m: (m / "config.json").write_text("[1, 2]"), "JSON object"),
    "deep nesting": (
        lambda m: (m / "config.json").write_text("[" * 200_000 + "]" * 200_000),
        "nested too deeply",
    ),
    "deep nesting in a field": (
        _config(lambda c: c.update(classes=json.loads("[" * 500 + "]" * 500))),
        "classes",
    ),
}

TENSOR_DAMAGE = {
    "scale zero": (_tensor("scaler_scale", np.zeros_like), "scaler_scale"),
    "scale negative": (_tensor("scaler_scale", lambda t: -t), "scaler_scale"),
    "scale inf": (_tensor("scaler_scale", lambda t: t * np.float32("inf")), "scaler_scale"),
    "scale nan": (_tensor("scaler_scale", lambda t: t * np.float32("nan")), "scaler_scale"),
    "coef int": (_tensor("coef", lambda t: t.astype(np.int32)), "dtype"),
    "mean int": (_tensor("scaler_mean", lambda t: t.astype(np.int64)), "dtype"),
    "coef huge": (_tensor("coef", lambda t: t + np.float32(1e30)), "coef"),
    "coef 1e7": (_tensor("coef", lambda t: t + np.float32(1e7)), "coef"),
    "intercept nan": (_tensor("intercept", lambda t: t * np.float32("nan")), "intercept"),
    "intercept -inf": (_tensor("intercept", lambda t: t - np.float32("inf")), "intercept"),
    "coef bool": (_tensor("coef", lambda t: t > 0), "dtype"),
}

NN_DAMAGE = {
    "running_var negative": (_tensor("layers.1.running_var", lambda t: -t - 1), "running_var"),
    "counter float": (
        _tensor("layers.1.num_batches_tracked", lambda t: t.astype(np.float32)),
        "dtype",
    ),
    "weight int": (_tensor("layers.0.weight", lambda t: t.astype(np.int16)), "dtype"),
    "weight huge": (_tensor("layers.0.weight", lambda t: t * np.float32(1e20)), "layers.0"),
    "dropout string": (_config(lambda c: c["head"].update(dropout="0.5")), "dropout"),
    "dropout 1": (_config(lambda c: c["head"].update(dropout=1)), "head.dropout"),
    "batchnorm string": (_config(lambda c: c["head"].update(batchnorm="yes")), "batchnorm"),
    "hidden bool": (_config(lambda c: c["head"].update(hidden=[True])), "hidden"),
    "hidden huge": (_config(lambda c: c["head"].update(hidden=[10**12])), "hidden"),
    "backbone string": (_config(lambda c: c.update(backbone="yes")), "backbone"),
}


def _refused(runner, model: Path, data: Path, command: str = "predict") -> str:
    r = runner.invoke(app, [command, str(model), str(data)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "NaN" not in r.stdout
    return lines[0]


@pytest.mark.parametrize("case", [*CONFIG_DAMAGE, *TENSOR_DAMAGE])
def test_hostile_svm_model_is_refused_with_one_line(runner, models, tmp_path, case):
    damage, field = {**CONFIG_DAMAGE, **TENSOR_DAMAGE}[case]
    model = _copy(models, "svm", tmp_path)
    damage(model)
    line = _refused(runner, model, models["data"] / "grass")
    assert field in line
    assert str(model) in line


@pytest.mark.parametrize("case", NN_DAMAGE)
def test_hostile_nn_model_is_refused_with_one_line(runner, models, tmp_path, case):
    damage, field = NN_DAMAGE[case]
    model = _copy(models, "mlp", tmp_path)
    damage(model)
    line = _refused(runner, model, models["data"] / "grass")
    assert field in line


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_damaged_data_config_is_refused_by_every_command(runner, models, tmp_path, command):
    model = _copy(models, "svm", tmp_path)
    _dc(std=[0, 0, 0])(model)
    data = models["data"] if command == "evaluate" else models["data"] / "grass"
    assert "data_config.std" in _refused(runner, model, data, command)


def test_untouched_models_still_load(runner, models):
    for kind in ("svm", "mlp"):
        r = runner.invoke(app, ["predict", str(models[kind]), str(models["data"] / "grass")])
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_non_finite_scores_are_refused_not_written(runner, models, tmp_path, monkeypatch, command):
    """Whatever makes a score NaN or infinite (a model the checks let through, a damaged
    features table), predict and evaluate fail instead of writing it."""
    from tlearn.heads.linear import LinearHead

    def nan_decisions(self, X):
        s = np.zeros((len(X), len(self.classes_)), np.float32)
        s[-1, 0] = np.nan
        return s

    # every score, probability and set is computed from the head's decision values
    monkeypatch.setattr(LinearHead, "decision_function", nan_decisions)
    out = tmp_path / "out.csv"
    data = models["data"] if command == "evaluate" else models["data"] / "grass"
    args = [command, str(models["svm"]), str(data), "-q"]
    if command == "predict":
        args += ["-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "NaN or infinite scores" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
