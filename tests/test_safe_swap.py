"""Replacing a model directory (fit --force) or a checkpoint never leaves none: a failure
or a kill at any rename leaves the old copy or the new one, and the next load or
--resume puts a hidden old copy back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import tlearn.core.atomic as atomic
from tests.conftest import TINY
from tlearn.cli.app import app
from tlearn.modeldir import load_model, save_model
from tlearn.train.checkpoint import has_checkpoint


class Boom(Exception):
    pass


def _fail_at(monkeypatch, n: int) -> None:
    """os.replace raises at its n-th call (1-based) from now on."""
    real, calls = _real_replace, {"n": 0}

    def replace(a, b, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure at rename {n}")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _count_replaces(monkeypatch) -> dict:
    real, calls = os.replace, {"n": 0}

    def replace(a, b, *args, **kwargs):
        calls["n"] += 1
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_failure_at_the_swap_renames_of_fit_force_leaves_a_model(
    runner, fitted_model, image_folder, monkeypatch
):
    """The two renames that swap the model directory in (no atomic exchange): a failure
    at either leaves the old model, loadable."""
    args = ["fit", str(image_folder), "-o", str(fitted_model), "--force", "--C", "0.5", "-q"]
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    calls = _count_replaces(monkeypatch)
    assert runner.invoke(app, [*args, *TINY]).exit_code == 0
    total = calls["n"]
    for n in (total - 1, total):  # model -> .old/d, then .tmp -> model
        _fail_at(monkeypatch, n)
        r = runner.invoke(app, [*args, "--C", "0.25", *TINY])
        assert r.exit_code == 1 and "injected failure" in r.output, r.output
        monkeypatch.setattr(os, "replace", _real_replace)
        assert load_model(fitted_model).config["head"]["C"] == 0.5  # the old one
        r = runner.invoke(app, ["predict", str(fitted_model), str(image_folder / "grass"), "-q"])
        assert r.exit_code == 0, r.output
        assert not [p for p in fitted_model.parent.iterdir() if p.name.startswith(".model.")]


_real_replace = os.replace


def _hide_as_killed(model: Path) -> None:
    """The state a kill between the two renames of a replacement leaves: the old copy in
    .NAME.*.old/d, the new one still in .NAME.*.tmp."""
    old = model.parent / f".{model.name}.abc123.old"
    old.mkdir()
    os.replace(model, old / "d")
    tmp = model.parent / f".{model.name}.def456.tmp"
    tmp.mkdir()
    (tmp / "config.json").write_text("{half")


def test_a_model_hidden_by_a_kill_is_put_back_on_load(runner, fitted_model, image_folder):
    _hide_as_killed(fitted_model)
    assert not fitted_model.exists()
    r = runner.invoke(app, ["predict", str(fitted_model), str(image_folder / "grass"), "-q"])
    assert r.exit_code == 0, r.output
    assert (fitted_model / "config.json").is_file()
    assert not list(fitted_model.parent.glob(".model.*.old"))


def test_a_checkpoint_hidden_by_a_kill_is_found_by_resume(tmp_path):
    model = tmp_path / "m"
    ckpt = model / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    _hide_as_killed(ckpt)
    assert has_checkpoint(model)
    # and a whole model directory hidden while it held the checkpoint
    _hide_as_killed(model)
    assert has_checkpoint(model)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_save_model_over_a_model_fails_cleanly_at_every_rename(tmp_path, monkeypatch, exchange, n):
    from tlearn.core.spec import CutSpec
    from tlearn.modeldir import build_config

    def config(c: float) -> dict:
        dc = {
            "input_size": [3, 32, 32],
            "interpolation": "bilinear",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "crop_pct": 0.875,
        }
        head = {"type": "svm", "C": c}
        spec = CutSpec("test_efficientnet", "none", None)
        return build_config(cut=spec, data_config=dc, classes=["a", "b"], head=head, feature_dim=4)

    tensors = {
        "scaler_mean": np.zeros(4, np.float32),
        "scaler_scale": np.ones(4, np.float32),
        "coef": np.ones((2, 4), np.float32),
        "intercept": np.zeros(2, np.float32),
    }
    out = tmp_path / "model"
    save_model(out, config(1.0), tensors, metrics={"a": 1})
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    _fail_at(monkeypatch, n)
    try:
        save_model(out, config(2.0), tensors, metrics={"a": 2}, force=True)
    except Boom:
        pass
    monkeypatch.undo()
    assert load_model(out).config["head"]["C"] in (1.0, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing hidden left
