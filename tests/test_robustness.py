"""Messy folders, --strict, interrupted runs, untrusted model directories, repeatability."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file, save_file

from tests import imagegen
from tests.conftest import TINY, draw, make_dataset
from tlearn.cli.app import app


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    info = imagegen.make_messy_folder(root)
    return root, info


def test_extract_on_messy_folder_keeps_exactly_the_readable_images(runner, messy, tmp_path):
    root, info = messy
    out = tmp_path / "f.csv"
    r = runner.invoke(app, ["extract", str(root), "-o", str(out), *TINY])
    assert r.exit_code == 0, r.output
    readable = {p for paths in info["images"].values() for p in paths} - set(info["unreadable"])
    df = pd.read_csv(out, keep_default_na=False)
    assert set(df["path"]) == readable
    assert df["path"].is_unique
    skipped = pd.read_csv(tmp_path / "f.csv.skipped.csv")  # named after the output
    expected = set(info["skipped"]) | set(info["unreadable"])
    assert set(skipped["path"]) == expected
    assert all(isinstance(reason, str) and reason for reason in skipped["reason"])
    assert f"{len(expected)} image(s) skipped" in r.stderr
    assert "empty" in r.stderr  # the class folder with no images is reported


def test_strict_fails_with_exit_3_and_writes_nothing(runner, messy, tmp_path):
    root, _ = messy
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "f.csv"
    r = runner.invoke(app, ["extract", str(root), "-o", str(out), "--strict", *TINY])
    assert r.exit_code == 3, r.output
    assert "--strict" in r.stderr and "truncated.jpg" in r.stderr
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial, no skipped list
    model = tmp_path / "m"
    r = runner.invoke(app, ["fit", str(root), "-o", str(model), "--strict", *TINY])
    assert r.exit_code == 3
    assert not model.exists()


def test_strict_passes_on_clean_folders(runner, image_folder, tmp_path):
    r = runner.invoke(
        app, ["extract", str(image_folder), "-o", str(tmp_path / "f.csv"), "--strict", *TINY]
    )
    assert r.exit_code == 0, r.output


def test_fit_and_predict_work_on_the_rest_of_a_messy_folder(runner, messy, tmp_path):
    root, info = messy
    model = tmp_path / "m"
    r = runner.invoke(app, ["fit", str(root), "-o", str(model), "--C", "0.1", *TINY])
    assert r.exit_code == 0, r.output
    assert json.loads((model / "config.json").read_text())["classes"] == ["cat", "dog"]
    assert len(pd.read_csv(model / "skipped.csv")) == 5
    r = runner.invoke(app, ["predict", str(model), str(root / "dog"), "-f", "jsonl"])
    assert r.exit_code == 0, r.output
    paths = [json.loads(line)["path"] for line in r.stdout.splitlines()]
    assert set(paths) == set(info["images"]["dog"]) - set(info["unreadable"])


def test_class_without_usable_images_is_left_out(runner, tmp_path):
    make_dataset(tmp_path / "d", classes=("asphalt", "gravel"), n=4)
    bad = tmp_path / "d" / "grass"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"garbage")
    r = runner.invoke(app, ["fit", str(tmp_path / "d"), "-o", str(tmp_path / "m"), *TINY])
    assert r.exit_code == 0, r.output
    assert "grass" in r.stderr and "left out" in r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["classes"] == ["asphalt", "gravel"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,class\na.png,x\n", "header"),
        ("path,label\n{img},\n", "line 2"),
        ("path,label\n{img},a\n{img},b\n", "line 3"),
        ("path,label\nmissing.png,a\n", "line 2"),
    ],
)
def test_labels_csv_errors_name_the_line(runner, tmp_path, content, message):
    img = draw(tmp_path / "a.png", (10, 20, 30), seed=0)
    labels = tmp_path / "labels.csv"
    labels.write_text(content.format(img=img))
    r = runner.invoke(
        app, ["fit", str(tmp_path), "--labels", str(labels), "-o", str(tmp_path / "m"), *TINY]
    )
    assert r.exit_code == 1, r.output
    assert message in r.stderr


def test_debug_shows_traceback(runner, tmp_path):
    r = runner.invoke(app, ["--debug", "predict", str(tmp_path / "nope"), str(tmp_path)])
    assert r.exit_code != 0
    assert r.exception is not None  # re-raised for the traceback


# ----------------------------------------------------------------------------- interruptions


def _extract_cmd(data, out, *extra):
    return [sys.executable, "-m", "tlearn", "extract", str(data), "-o", str(out), "-q"] + [
        "--model",
        "test_efficientnet",
        "--weights",
        "none",
        "--batch-size",
        "2",
        "--workers",
        "0",
        *extra,
    ]


def _wait_for_partial(out: Path, size: int = 20_000) -> Path:
    """OUT.partial once it holds `size` bytes (some finished batches), or after 120 s."""
    partial = Path(f"{out}.partial")
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.exists() and partial.stat().st_size > size:
            break
        time.sleep(0.05)
    return partial


def test_kill_during_extract_leaves_no_partial_output_and_resume_completes(tmp_path):
    data = tmp_path / "many"
    make_dataset(data, n=40)  # 120 images, batches of 2
    out = tmp_path / "out.csv"
    out.write_text("old,complete,file\n")  # a previous good output must survive
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_extract_cmd(data, out), env=env)
    partial = _wait_for_partial(out)
    assert proc.poll() is None, "extract finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.read_text() == "old,complete,file\n"
    assert partial.exists()
    # resume keeps the finished rows and appends the rest
    r = subprocess.run(_extract_cmd(data, out, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    resumed = pd.read_csv(out)
    full = tmp_path / "full.csv"
    r = subprocess.run(_extract_cmd(data, full), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fresh = pd.read_csv(full)
    assert resumed["path"].tolist() == fresh["path"].tolist()
    np.testing.assert_array_equal(resumed.iloc[:, 2:].to_numpy(), fresh.iloc[:, 2:].to_numpy())


def test_resume_refuses_a_partial_from_other_options(runner, image_folder, tmp_path):
    out = tmp_path / "f.csv"
    Path(f"{out}.partial").write_text("path,label,f0\nx,y,1\n")
    Path(f"{out}.partial.json").write_text(json.dumps({"cut": {"model": "other"}}))
    r = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "--resume", *TINY])
    assert r.exit_code == 1
    assert "without --resume" in r.stderr


def test_resume_drops_a_half_written_last_row(image_folder, tmp_path):
    from tlearn.features.table import kept_rows

    out = tmp_path / "f.csv"
    meta = {"cut": {"model": "m"}, "data_config": {}, "feature_dim": 2}
    Path(f"{out}.partial.json").write_text(json.dumps(meta))
    Path(f"{out}.partial").write_text("path,label,f0,f1\r\na.png,x,1,2\r\nb.png,x,3")
    assert kept_rows(out, meta) == [("a.png", "x")]
    assert Path(f"{out}.partial").read_bytes() == b"path,label,f0,f1\r\na.png,x,1,2\r\n"


# ----------------------------------------------------------------------------- model files


def _edit_config(model: Path, fn) -> None:
    cfg = json.loads((model / "config.json").read_text())
    fn(cfg)
    (model / "config.json").write_text(json.dumps(cfg))


def _truncate_head(model: Path) -> None:
    data = (model / "head.safetensors").read_bytes()
    (model / "head.safetensors").write_bytes(data[: len(data) // 2])


def _reshape_coef(model: Path) -> None:
    t = load_file(str(model / "head.safetensors"))
    t["coef"] = t["coef"][:, :10].copy()
    save_file(t, str(model / "head.safetensors"))


def _extra_tensor(model: Path) -> None:
    t = load_file(str(model / "head.safetensors"))
    t["backdoor"] = np.zeros(3, np.float32)
    save_file(t, str(model / "head.safetensors"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate_head, "safetensors"),
        (lambda m: _edit_config(m, lambda c: c.pop("classes")), "classes"),
        (lambda m: _edit_config(m, lambda c: c.update(classes=["a", "b"])), "shape"),
        (lambda m: _edit_config(m, lambda c: c.update(format_version=99)), "format_version"),
        (lambda m: _edit_config(m, lambda c: c["head"].update(type="pickle")), "head type"),
        (lambda m: (m / "config.json").write_text("{not json"), "JSON"),
        (lambda m: (m / "head.safetensors").unlink(), "head.safetensors"),
        (_reshape_coef, "shape"),
        (_extra_tensor, "unexpected"),
    ],
)
def test_damaged_model_directory_is_refused(runner, fitted_model, image_folder, damage, message):
    damage(fitted_model)
    r = runner.invoke(app, ["predict", str(fitted_model), str(image_folder / "grass")])
    assert r.exit_code == 1, r.output
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_model_directory_holds_no_pickle(fitted_model):
    for p in fitted_model.iterdir():
        assert p.suffix in (".json", ".safetensors", ".csv")
        assert not p.read_bytes().startswith(b"\x80")  # pickle protocol marker


# ----------------------------------------------------------------------------- repeatability


def test_same_seed_same_features_and_same_svm(runner, image_folder, tmp_path):
    outs = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.csv"
        assert (
            runner.invoke(app, ["extract", str(image_folder), "-o", str(f), "-q", *TINY]).exit_code
            == 0
        )
        m = tmp_path / name
        r = runner.invoke(
            app, ["fit", str(f), "-o", str(m), "-q", "--seed", "3", "--val-split", "0.3"]
        )
        assert r.exit_code == 0, r.output
        outs.append((f.read_bytes(), load_file(str(m / "head.safetensors"))))
    assert outs[0][0] == outs[1][0]
    for k in outs[0][1]:
        np.testing.assert_array_equal(outs[0][1][k], outs[1][1][k])


@pytest.mark.parametrize("cache", [[], ["--no-cache"]], ids=["cache", "no-cache"])
def test_ctrl_c_during_extract_with_workers_is_quiet_and_resumable(tmp_path, cache):
    """Ctrl-C reaches every process of the group: the decoding workers must leave it to
    the main process (no tracebacks of theirs), which keeps the partial file (flushed per
    batch, with or without the feature cache) and says how to continue; --resume then
    computes only the rest."""
    data = tmp_path / "many"
    make_dataset(data, n=60)  # 180 images, batches of 2
    out = tmp_path / "out.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _extract_cmd(data, out, *cache)
    cmd[cmd.index("--workers") + 1] = "2"
    proc = subprocess.Popen(
        [c for c in cmd if c != "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, like a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = _wait_for_partial(out)
    assert proc.poll() is None, "extract finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err and "--resume" in err and str(partial) in err.replace("\n", "")
    assert partial.exists() and not out.exists()
    kept = len(pd.read_csv(partial))
    assert kept > 0
    resume = _extract_cmd(data, out, "--resume", "--json", *cache)
    r = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(out)) == 180
    engine = json.loads(r.stdout)["engine"]
    assert engine["computed"] + engine["cached"] == 180 - kept  # only the rest
    if cache:
        assert engine["cached"] == 0
