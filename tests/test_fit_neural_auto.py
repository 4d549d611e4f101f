"""`fit --head linear|mlp --layer auto`: the cut searched by a linear probe on the training
images only, the network cut there and trained, the search recorded; and the head-only
--freeze-epochs phase in the time estimate."""

from __future__ import annotations

import json
from pathlib import Path

import tlearn.core.deadline as clock
from tests.conftest import TINY
from tests.test_presets import FakeClock
from tlearn.cli.app import app
from tlearn.train.loop import Trainer


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_neural_head_on_the_searched_cut(image_folder, tmp_path, runner):
    out = tmp_path / "m"
    args = ["fit", str(image_folder), "-o", str(out), "--head", "linear", "--layer", "auto"]
    result = runner.invoke(app, [*args, "--val-split", "0.25", "--epochs", "1", *TINY])
    assert result.exit_code == 0, result.output
    config = _config(out)
    auto = config["layer_auto"]
    assert auto["chosen"] and config["cut"]["layers"] == auto["chosen"]
    assert set(auto["chosen"]) <= set(auto["candidates"])
    # the search saw the training images only, never the validation split
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["n_images"] == config["train"]["n_images"]
    assert config["train"]["n_val"] > 0
    assert sweep["n_images"] + config["train"]["n_val"] == 18  # image_folder: 3 x 6 images
    assert f"--layer auto: {','.join(auto['chosen'])}, the best" in result.output
    pred = runner.invoke(app, ["predict", str(out), str(image_folder), "-o", "-", "-q"])
    assert pred.exit_code == 0, pred.output
    assert len(pred.stdout.strip().splitlines()) == 1 + 18


def test_json_reports_the_searched_cut(image_folder, tmp_path, runner):
    out = tmp_path / "m"
    args = ["fit", str(image_folder), "-o", str(out), "--head", "linear", "--layer", "auto"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--json", "-q", *TINY])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["layer_auto"]["chosen"] == _config(out)["cut"]["layers"]
    assert got["kept_phase"] is None  # no --freeze-epochs: nothing to choose between


def test_existing_output_fails_before_the_search(image_folder, tmp_path, runner):
    out = tmp_path / "m"
    out.mkdir()
    args = ["fit", str(image_folder), "-o", str(out), "--head", "linear", "--layer", "auto"]
    result = runner.invoke(app, [*args, *TINY])
    assert result.exit_code != 0
    assert "already exists; choose another -o or pass --force" in result.output
    assert "cut search" not in result.output and "Traceback" not in result.output


def test_layer_auto_with_a_neural_head_is_refused_under_torchrun(
    image_folder, tmp_path, runner, monkeypatch
):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["fit", str(image_folder), "-o", str(tmp_path / "m"), "--head", "linear"]
    result = runner.invoke(app, [*args, "--layer", "auto", *TINY])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not under torchrun" in lines[0]
    assert "then torchrun with --layer NAME" in lines[0]
    assert not (tmp_path / "m").exists()


def test_head_only_epochs_are_estimated_apart(split_folder, tmp_path, runner, monkeypatch):
    # each look at the clock takes 1 s: the head-only epoch is told on its own, and the
    # estimate that may shorten the run is measured again in the first unfrozen epoch
    monkeypatch.setattr(clock, "now", FakeClock(step=1.0))
    out = tmp_path / "m"
    args = ["fit", str(split_folder), "-o", str(out), "--head", "linear", "--batch-size", "2"]
    args += ["--freeze-to", "blocks.0", "--freeze-epochs", "1", "--epochs", "10"]
    result = runner.invoke(app, [*args, "--time-limit", "90s", "--augment", "none", *TINY])
    assert result.exit_code == 0, result.output
    assert "per head-only epoch" in result.output
    assert "the epochs that also train the backbone are measured when they start" in result.output
    train = _config(out)["train"]
    n = train["settings"]["options"]["epochs"]
    assert f"shortening the run to {n} epoch(s)" in result.output
    assert 2 <= n < 10 and train["epochs_run"] == n
    assert train["time_limit"]["epochs_planned"] == 10
    assert train["settings"]["options"]["freeze_epochs"] == 1
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["lr"] < 1e-4  # the unfrozen phase's schedule anneals by the end
    assert train["kept_phase"] in ("head only", "layers after blocks.0 trained")
    assert f"epoch {train['best_epoch']} kept ({train['kept_phase']})" in result.output


def test_an_interrupted_searched_run_resumes_with_its_search(
    split_folder, tmp_path, runner, monkeypatch
):
    out = tmp_path / "m"
    real = Trainer.train_epoch

    def ctrl_c_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_in_epoch_2)
    args = ["fit", str(split_folder), "-o", str(out), "--head", "linear", "--layer", "auto"]
    result = runner.invoke(app, [*args, "--epochs", "2", "--augment", "none", *TINY])
    assert result.exit_code != 0 and (out / "checkpoint").is_dir()
    monkeypatch.setattr(Trainer, "train_epoch", real)
    again = runner.invoke(app, ["fit", str(split_folder), "--resume", str(out)])
    assert again.exit_code == 0, again.output
    assert "cut search" not in again.output  # the saved cut is used, not searched again
    config = _config(out)
    assert config["cut"]["layers"] == config["layer_auto"]["chosen"]
    assert config["train"]["epochs_run"] == 2 and (out / "sweep.json").is_file()
