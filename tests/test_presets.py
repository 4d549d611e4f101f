"""fit --preset fast|balanced|best and --time-limit: recipes applied and recorded, explicit
options winning, strict parsing, deterministic stopping (a fake clock, never timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import tlearn.core.deadline as clock
from tests.conftest import TINY, fix_svm_accuracy
from tlearn.cli.app import app
from tlearn.core import presets
from tlearn.core.deadline import parse_duration
from tlearn.core.errors import UsageError
from tlearn.jobs.sweep import SweepRow, choose_cut
from tlearn.train.loop import Trainer


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _fit(runner, data, out, *args):
    result = runner.invoke(app, ["fit", str(data), "-o", str(out), *args, *TINY])
    assert result.exit_code == 0, result.output
    return result


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "name, extra, applied",
    [
        ("fast", [], {"head": "svm", "C": "auto"}),
        ("balanced", [], {"head": "svm", "layer": "auto", "C": "auto"}),
        (
            "best",
            ["--epochs", "2"],
            {
                "head": "linear",
                "layer": "auto",
                "freeze_to": "auto",
                "freeze_epochs": 1,
                "layer_decay": 0.5,
                "augment": "standard",
                "label_smoothing": 0.1,
                "patience": 3,
                "time_limit": "55m",
                "choose_tta": True,
                "compare_svm": True,
                "val_split": 0.15,
            },
        ),
    ],
)
def test_each_preset_runs_and_records_its_recipe(
    name, extra, applied, image_folder, tmp_path, runner, monkeypatch
):
    out = tmp_path / name
    fix_svm_accuracy(monkeypatch, 0.0)  # best compares with an SVM: here the network is kept
    result = _fit(runner, image_folder, out, "--preset", name, *extra)
    assert f"preset {name}: " in result.output
    preset = _config(out)["preset"]
    assert preset["name"] == name
    assert preset["set"] == applied
    # TINY's --model is the user's: it overrides the preset's backbone
    assert preset["overridden"]["model"]["given"] == "test_efficientnet"
    assert "given, so kept: --model test_efficientnet" in result.output
    config = _config(out)
    if name == "balanced":
        assert config["layer_auto"]["choice"].startswith("the best")
        assert "estimate: the layer sweep takes" in result.output
        assert "chosen (*): the best" in result.output
    if name == "best":
        train = config["train"]
        opts = train["settings"]["options"]
        assert (opts["head"], opts["freeze_to"], opts["layer_decay"]) == ("linear", "auto", 0.5)
        assert (opts["augment"], opts["label_smoothing"], opts["patience"]) == ("standard", 0.1, 3)
        assert train["settings"]["val_split"] == 0.15 and train["n_val"] > 0
        # the cut was searched first (a linear probe), then the network cut there
        auto = config["layer_auto"]
        assert config["cut"]["layers"] == auto["chosen"]
        assert auto["probe"].startswith("linear SVM on frozen features")
        assert (out / "sweep.json").is_file()
        assert "--layer auto: " in result.output and "estimate: the layer sweep" in result.output
        # one head-only epoch, then the stages after --freeze-to: validation picks the epoch
        assert opts["freeze_epochs"] == 1 and train["epochs_run"] == 2
        after = f"layers after {train['freeze_to']} trained" if train["freeze_to"] else None
        expected = "head only" if train["best_epoch"] == 1 else after or "backbone trained"
        assert train["kept_phase"] == expected
        assert "unfreezing chosen by validation: epoch" in result.output
        limit = {"seconds": 3300.0, "reached": False, "epochs_planned": None}
        assert train["time_limit"] == limit
        # --freeze-to auto is resolved at the searched cut (an early cut has no middle stage)
        assert train["freeze_to"] or "no middle stage before the cut" in result.output
        assert config["backbone"]["trained"] is True
        # TTA chosen on the validation images, recorded for predict and evaluate
        assert config["tta"]["chosen"] in ("none", "flip")
        assert config["tta"]["n_images"] == train["n_val"]
        assert config["compared"]["kept"] == "network"
        assert "compared on " in result.output


def test_explicit_options_override_the_preset(split_folder, tmp_path, runner):
    out = tmp_path / "m"
    args = ["--preset", "best", "--epochs", "1", "--augment", "flip", "--layer-decay", "0.3"]
    result = _fit(runner, split_folder, out, *args, "--no-compare-svm", "--no-choose-tta")
    preset = _config(out)["preset"]
    # every choice of a preset can be turned off, flags included
    assert preset["overridden"]["compare_svm"] == {"preset": True, "given": False}
    assert preset["overridden"]["choose_tta"] == {"preset": True, "given": False}
    assert "compared" not in _config(out) and "tta" not in _config(out)
    assert preset["overridden"]["augment"] == {"preset": "standard", "given": "flip"}
    assert preset["overridden"]["layer_decay"] == {"preset": 0.5, "given": 0.3}
    assert "augment" not in preset["set"] and preset["set"]["freeze_to"] == "auto"
    # DATA/val exists: no validation split is carved from the training images
    assert "val_split" not in preset["set"] and "val_split" not in preset["overridden"]
    train = _config(out)["train"]
    assert train["settings"]["options"]["augment"] == "flip" and train["augment"] == "flip"
    assert train["layer_decay"] == 0.3 and train["settings"]["val_split"] is None
    assert "--augment flip (preset: standard)" in result.output
    # --epochs 1 leaves no epoch after a head-only one: the preset's --freeze-epochs goes
    why = "--epochs 1 leaves no epoch after the head-only one"
    assert preset["dropped"] == {"freeze_epochs": why}
    assert "not applied: --freeze-epochs 1 (--epochs 1 leaves no epoch" in result.output
    assert train["settings"]["options"]["freeze_epochs"] == 0


@pytest.mark.parametrize(
    "given, dropped",
    [
        ({"freeze": "none"}, {"freeze_to", "freeze_epochs"}),
        ({"freeze": "all"}, {"freeze_to", "freeze_epochs", "layer_decay"}),
        ({"lr_groups": "blocks.0=0;head=1e-3"}, {"freeze_to", "freeze_epochs", "layer_decay"}),
        ({"epochs": 1}, {"freeze_epochs"}),
        ({"epochs": 1, "freeze_epochs": 0}, set()),
        ({"epochs": 5}, set()),
        ({"freeze_to": "blocks.1"}, set()),
    ],
)
def test_options_the_user_gave_drop_the_presets_that_contradict_them(given, dropped):
    recipe = presets.resolve_preset("best", given=given, has_val=True)
    assert set(recipe.dropped) == dropped
    assert not dropped & set(recipe.applied)


def test_best_with_freeze_none_runs_without_a_contradiction(split_folder, tmp_path, runner):
    out = tmp_path / "m"
    args = ["--preset", "best", "--epochs", "2", "--freeze", "none", "--layer", "blocks.1"]
    result = _fit(runner, split_folder, out, *args, "--no-compare-svm")
    assert "not applied: --freeze-to auto (--freeze none says what trains)" in result.output
    opts = _config(out)["train"]["settings"]["options"]
    assert (opts["freeze"], opts["freeze_to"], opts["freeze_epochs"]) == ("none", None, 0)


def test_preset_options_of_the_other_head_still_fail(image_folder, tmp_path, runner):
    # balanced is an SVM recipe: a neural-head option given with it is the user's mistake
    args = ["fit", str(image_folder), "-o", str(tmp_path / "m"), "--preset", "balanced"]
    result = runner.invoke(app, [*args, "--epochs", "3", *TINY])
    assert result.exit_code == 2 and "--epochs applies to neural heads only" in result.output


def test_fast_is_identical_to_plain_fit(image_folder, tmp_path, runner):
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    _fit(runner, image_folder, plain, "-q")
    _fit(runner, image_folder, fast, "-q", "--preset", "fast")
    a, b = load_file(str(plain / "head.safetensors")), load_file(str(fast / "head.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ca, cb = _config(plain), _config(fast)
    assert "preset" not in ca and cb["preset"]["name"] == "fast"
    for c in (ca, cb):
        c.pop("created"), c.pop("preset", None)
        for r in c["head"]["cv"]:
            r.pop("fit_seconds")  # a timing
    assert ca == cb


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "fastest"], "unknown --preset 'fastest'; allowed: fast, balanced, best"),
        (["--time-limit", "10"], "--time-limit '10': use a number with a unit"),
        (["--time-limit", "30 min"], "--time-limit '30 min'"),
        (["--time-limit", "0s"], "must be longer than zero"),
        (["--time-limit", "1h1h"], "each unit at most once"),
        (["--preset", "best", "--time-limit", "soon"], "--time-limit 'soon'"),
        (["--preset", "best", "--resume", "somewhere"], "drop --preset"),
    ],
)
def test_bad_preset_and_time_limit_values(args, message, image_folder, tmp_path, runner):
    result = runner.invoke(app, ["fit", str(image_folder), "-o", str(tmp_path / "m"), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5h", 5400), ("1h30m", 5400), (" 2M ", 120)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5", "-5m", "5d", "1h 30m", "30m1h30m", "0h0m"])
def test_bad_durations(text):
    with pytest.raises(UsageError, match="--time-limit"):
        parse_duration(text)


def test_best_uses_the_largest_bundled_backbone(monkeypatch):
    installed = set()
    monkeypatch.setattr(
        presets, "bundled_weights_file", lambda m: Path("w.pth") if m in installed else None
    )
    assert presets.recipe_values("best", has_val=True)[0]["model"] == "tf_efficientnet_lite0"
    installed.update({"tf_efficientnet_lite0", "tf_efficientnet_lite1"})
    values, _ = presets.recipe_values("best", has_val=True)
    assert values["model"] == "tf_efficientnet_lite1" and "val_split" not in values
    installed.add("tf_efficientnet_lite2")
    values, notes = presets.recipe_values("best", has_val=False)
    assert values["model"] == "tf_efficientnet_lite2" and values["val_split"] == 0.15
    assert any("cut:" in n for n in notes)
    assert presets.recipe_values("balanced", has_val=False)[0]["model"] == "tf_efficientnet_lite1"


def _row(name: str, mean: float, std: float) -> SweepRow:
    return SweepRow(tuple(name.split(",")), 8, None, 0, 0.0, mean, std, 0.1, 0.0, 0.0)


@pytest.mark.parametrize(
    "pair_mean, picked",
    [(0.79, "a"), (0.80, "a"), (0.81, "a"), (0.8105, "a,b"), (0.85, "a,b")],
)
def test_layer_auto_takes_a_pair_only_beyond_the_cv_noise(pair_mean, picked):
    # single: 0.80 +- 0.0224 over 5 folds -> one standard error 0.0100
    single = _row("a", 0.80, 0.0224)
    chosen, why = choose_cut(single, _row("a,b", pair_mean, 0.01), folds=5)
    assert chosen.name == picked
    assert "CV noise 0.0100" in why
    assert choose_cut(single, None, folds=5)[0] is single


# ----------------------------------------------------------------------------- time limit


class FakeClock:
    """The clock every Deadline reads: it moves only when a test moves it."""

    def __init__(self, t: float = 1000.0, step: float = 0.0):
        self.t, self.step = t, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_time_limit_stops_training_at_an_epoch_boundary(
    split_folder, tmp_path, runner, monkeypatch
):
    fake = FakeClock()
    monkeypatch.setattr(clock, "now", fake)
    train_epoch = Trainer.train_epoch

    def slow_epoch(self, epoch):  # every epoch "takes" 25 s of the fake clock
        fake.t += 25
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", slow_epoch)
    out = tmp_path / "m"
    args = ["--head", "linear", "--epochs", "5", "--time-limit", "1m", "--augment", "none"]
    result = _fit(runner, split_folder, out, *args, "--batch-size", "2")
    # after 2 epochs (50 s) another 25 s epoch would end after 60 s
    assert "stopping for the time limit" in result.output
    assert "2 epochs (stopped for the time limit)" in result.output
    train = _config(out)["train"]
    limit = {"seconds": 60.0, "reached": True, "epochs_planned": None}
    assert train["epochs_run"] == 2 and train["time_limit"] == limit
    assert train["best_epoch"] in (1, 2)


def test_time_limit_shortens_the_schedule_after_the_estimate(
    split_folder, tmp_path, runner, monkeypatch
):
    # each look at the clock takes 1 s: 2 images per batch -> 2 img/s, and an epoch of
    # 18 training + 9 validation images is estimated at 13.5 s; of the 40 s limit about
    # 33 s are left when the estimate is made: room for 2 of the 10 epochs
    monkeypatch.setattr(clock, "now", FakeClock(step=1.0))
    out = tmp_path / "m"
    args = ["--head", "linear", "--epochs", "10", "--time-limit", "40s", "--batch-size", "2"]
    result = _fit(runner, split_folder, out, *args)
    assert "estimate: about 14s per epoch, 2m 15s for 10 epoch(s) (2 img/s" in result.output
    assert "leaves room for about 2: shortening the run to 2 epoch(s)" in result.output
    assert "2 epochs (of 10: shortened to fit the time limit)" in result.output
    train = _config(out)["train"]
    assert train["epochs_run"] == 2 and train["settings"]["options"]["epochs"] == 2
    assert train["time_limit"]["epochs_planned"] == 10
    # the re-planned cosine schedule anneals by the end of epoch 2 (unshortened: ~1e-3)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["lr"] < 1e-4


def test_time_limit_keeps_running_while_epochs_fit(split_folder, tmp_path, runner, monkeypatch):
    monkeypatch.setattr(clock, "now", FakeClock())  # no time passes: every epoch fits
    out = tmp_path / "m"
    _fit(runner, split_folder, out, "--head", "linear", "--epochs", "2", "--time-limit", "1s")
    assert _config(out)["train"]["time_limit"]["reached"] is False
    assert _config(out)["train"]["epochs_run"] == 2


def test_time_limit_stops_the_c_grid_and_the_layer_sweep(
    split_folder, tmp_path, runner, monkeypatch
):
    monkeypatch.setattr(clock, "now", FakeClock(step=100.0))  # every look costs 100 s
    grid = tmp_path / "grid"
    result = _fit(runner, split_folder, grid, "--time-limit", "90s")
    assert "(stopped for the time limit: best so far kept)" in result.output
    config = _config(grid)
    assert config["head"]["C"] == 1e-4 and len(config["head"]["cv"]) == 1
    assert config["train"]["time_limit"]["reached"] is True
    assert "the C grid stopped before C=0.0003" in config["train"]["time_limit"]["stopped"][0]

    sweep = tmp_path / "sweep"
    result = _fit(runner, split_folder, sweep, "--preset", "balanced", "--time-limit", "90s")
    auto = _config(sweep)["layer_auto"]
    assert auto["candidates"] == ["blocks.0"] and auto["best_pair"] is None
    assert "layers not scored: blocks.1" in auto["time_limit"][0]
    assert _config(sweep)["train"]["time_limit"]["reached"] is True
