"""fit --choose-tta (part of --preset best): flip or no test-time augmentation, whichever
scores better on the validation images, recorded in config.json and used by predict and
evaluate unless --tta says otherwise."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY
from tlearn.cli.app import app


def _config(model) -> dict:
    return json.loads((model / "config.json").read_text())


@pytest.mark.parametrize(
    "how",
    [
        [],  # frozen backbone: the engine's features and its mirrored view
        ["--freeze-to", "blocks.3", "--augment", "none"],  # part trains: images, flipped
    ],
)
def test_choose_tta_records_both_accuracies_and_the_better_choice(
    how, split_folder, tmp_path, runner
):
    out = tmp_path / "m"
    args = ["fit", str(split_folder), "--head", "linear", "--epochs", "1", "--choose-tta"]
    r = runner.invoke(app, [*args, *how, "-o", str(out), *TINY])
    assert r.exit_code == 0, r.output
    tta = _config(out)["tta"]
    acc = tta["val_accuracy"]
    assert tta["n_images"] == _config(out)["train"]["n_val"] > 0
    assert all(0 <= acc[k] <= 1 for k in ("none", "flip"))
    assert tta["chosen"] == ("flip" if acc["flip"] > acc["none"] else "none")
    assert "test-time augmentation: " in r.output


def test_predict_and_evaluate_use_the_models_choice_unless_told(split_folder, tmp_path, runner):
    out = tmp_path / "m"
    args = ["fit", str(split_folder), "--head", "linear", "--epochs", "1", "--choose-tta"]
    assert runner.invoke(app, [*args, "-o", str(out), "-q", *TINY]).exit_code == 0
    config = _config(out)
    config["tta"]["chosen"] = "flip"  # whatever the tiny model chose: make it flip
    (out / "config.json").write_text(json.dumps(config))
    val = str(split_folder / "val")
    m = json.loads(runner.invoke(app, ["evaluate", str(out), val, "--json"]).stdout)
    assert m["tta"] == "flip"
    told = runner.invoke(app, ["evaluate", str(out), val, "--json", "--tta", "none"])
    assert "tta" not in json.loads(told.stdout)
    flip = runner.invoke(app, ["predict", str(out), val, "-f", "json", "--tta", "flip"])
    default = runner.invoke(app, ["predict", str(out), val, "-f", "json"])
    assert default.exit_code == 0 and json.loads(default.stdout) == json.loads(flip.stdout)


def test_without_choose_tta_nothing_changes(split_folder, tmp_path, runner):
    out = tmp_path / "m"
    args = ["fit", str(split_folder), "--head", "linear", "--epochs", "1"]
    assert runner.invoke(app, [*args, "-o", str(out), "-q", *TINY]).exit_code == 0
    assert "tta" not in _config(out)
    m = json.loads(
        runner.invoke(app, ["evaluate", str(out), str(split_folder / "val"), "--json"]).stdout
    )
    assert "tta" not in m


@pytest.mark.parametrize("bad", ["10crop", None, 3, "sideways"])
def test_a_bad_recorded_choice_is_refused(split_folder, tmp_path, runner, bad):
    out = tmp_path / "m"
    args = ["fit", str(split_folder), "--head", "linear", "--epochs", "1"]
    assert runner.invoke(app, [*args, "-o", str(out), "-q", *TINY]).exit_code == 0
    config = _config(out)
    config["tta"] = {"chosen": bad}
    (out / "config.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["predict", str(out), str(split_folder / "val")])
    assert r.exit_code == 1 and "tta.chosen" in r.stderr
