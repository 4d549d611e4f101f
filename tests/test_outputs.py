"""Outputs a script can predict: file permissions follow the umask, a missing output
folder is an error naming it, skipped lists are named after their output, and predict's
format follows -o's extension."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import TINY, make_dataset

from tlearn.cli.app import app
from tlearn.core.atomic import atomic_dir, atomic_file, check_output_parent
from tlearn.core.errors import OutputError, UsageError
from tlearn.report.predictions import choose_format


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from typer.testing import CliRunner

    data = tmp_path_factory.mktemp("data") / "d"
    make_dataset(data, n=3)
    out = tmp_path_factory.mktemp("m") / "model"
    r = CliRunner().invoke(app, ["fit", str(data), "-o", str(out), "-q", "--C", "0.01", *TINY])
    assert r.exit_code == 0, r.output
    return out


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in [root, *root.rglob("*")]
        if not p.is_symlink()
    }


def test_atomic_writes_follow_the_umask(tmp_path, umask022):
    with atomic_file(tmp_path / "f.txt") as f:
        f.write("x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "inner").write_text("y")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    os.umask(0o077)
    with atomic_file(tmp_path / "private.txt") as f:
        f.write("x")
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_every_file_a_fit_extract_predict_writes_is_readable_by_others(
    runner, image_folder, tmp_path, umask022
):
    out = tmp_path / "out"
    out.mkdir()
    model = out / "m"
    r = runner.invoke(app, ["fit", str(image_folder), "-o", str(model), "-q", *TINY])
    assert r.exit_code == 0, r.output
    for args in (
        ["fit", str(image_folder), "-o", str(out / "nn"), "-q", "--head", "linear", *TINY],
        ["extract", str(image_folder), "-o", str(out / "f.csv"), "-q", *TINY],
        ["predict", str(model), str(image_folder), "-o", str(out / "p.jsonl"), "-q"],
        ["evaluate", str(model), str(image_folder), "-o", str(out / "report"), "-q"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    modes = _modes(out)
    assert len(modes) > 10
    wrong = {n: oct(m) for n, m in modes.items() if m != (0o755 if (out / n).is_dir() else 0o644)}
    assert wrong == {}


@pytest.mark.parametrize(
    "command",
    [
        ["extract", "{data}", "-o", "{missing}/f.csv"],
        ["fit", "{data}", "-o", "{missing}/model"],
        ["fit", "{data}", "-o", "{missing}/model", "--head", "linear", "--epochs", "1"],
        ["predict", "{model}", "{data}", "-o", "{missing}/p.csv"],
        ["evaluate", "{model}", "{data}", "-o", "{missing}/report"],
        ["sweep", "{data}", "-o", "{missing}/sweep"],
    ],
)
def test_a_missing_output_folder_is_an_error_naming_it(
    runner, image_folder, model, tmp_path, command
):
    missing = tmp_path / "no" / "dir"
    args = [a.format(data=image_folder, missing=missing, model=model) for a in command]
    extra = TINY if args[0] in ("extract", "fit", "sweep") else []
    r = runner.invoke(app, [*args, *extra])
    assert r.exit_code == 1, r.output
    assert f"the folder {missing}" in r.stderr and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()  # nothing was created on the way


def test_check_output_parent_accepts_a_bare_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_parent("f.csv") == Path("f.csv")
    with pytest.raises(OutputError, match="is not a folder"):
        (tmp_path / "file").write_text("x")
        check_output_parent(tmp_path / "file" / "f.csv")


def test_two_extracts_into_one_folder_keep_both_skip_lists(runner, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_dataset(a, n=2)
    make_dataset(b, n=2)
    (a / "grass" / "bad_a.jpg").write_bytes(b"not an image")
    (b / "grass" / "bad_b.jpg").write_bytes(b"not an image either")
    out = tmp_path / "out"
    out.mkdir()
    for src, name in ((a, "a.csv"), (b, "b.csv")):
        r = runner.invoke(app, ["extract", str(src), "-o", str(out / name), "-q", *TINY])
        assert r.exit_code == 0, r.output
        side = json.loads((out / f"{name}.json").read_text())
        assert side["skipped_csv"] == f"{name}.skipped.csv"
    assert "bad_a.jpg" in (out / "a.csv.skipped.csv").read_text()
    assert "bad_b.jpg" in (out / "b.csv.skipped.csv").read_text()
    assert not (out / "skipped.csv").exists()


def test_predict_without_output_writes_nothing_in_the_working_directory(
    runner, model, image_folder, tmp_path, monkeypatch
):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = runner.invoke(app, ["predict", str(model), str(image_folder), "-f", "csv"])
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize(
    "name, first",
    [
        ("p.csv", "path,prediction,score"),
        ("p.tsv", "path\tprediction\tscore"),
        ("p.jsonl", '{"path":'),
        ("p.json", '{"score":'),
        ("p.out", "path,prediction,score"),  # an unknown extension: csv, as before
    ],
)
def test_predict_infers_the_format_from_the_extension(
    runner, model, image_folder, tmp_path, name, first
):
    out = tmp_path / name
    r = runner.invoke(app, ["predict", str(model), str(image_folder), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert out.read_text().startswith(first)
    assert (tmp_path / f"{name}.skipped.csv").read_text().startswith("path,reason")
    if name.endswith(".jsonl"):
        assert all(json.loads(line)["prediction"] for line in out.read_text().splitlines())
    if name.endswith(".tsv"):
        rows = list(csv.reader(out.read_text().splitlines(), delimiter="\t"))
        assert len(rows) > 1 and all(len(r) == len(rows[0]) for r in rows)
        assert rows[0][:3] == ["path", "prediction", "score"]


def test_predict_refuses_a_format_that_contradicts_the_extension(
    runner, model, image_folder, tmp_path
):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["predict", str(model), str(image_folder), "-o", str(out), "-f", "csv"])
    assert r.exit_code == 2, r.output
    assert "p.json" in r.stderr and "--format" in r.stderr
    assert not out.exists()


def test_predict_dash_means_stdout(runner, model, image_folder, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = runner.invoke(app, ["predict", str(model), str(image_folder), "-o", "-", "-f", "jsonl"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["path"]
    assert list((tmp_path / "cwd").iterdir()) == []  # no file named "-"


@pytest.mark.parametrize(
    "output, fmt, terminal, expected",
    [
        (None, None, True, "table"),
        (None, None, False, "csv"),
        ("-", None, True, "csv"),
        ("x.TSV", None, False, "tsv"),
        ("x.ndjson", None, False, "jsonl"),
        ("x.csv", "csv", False, "csv"),
        ("x.dat", "json", False, "json"),
    ],
)
def test_choose_format(output, fmt, terminal, expected):
    assert choose_format(output, fmt, terminal) == expected


@pytest.mark.parametrize("output, fmt", [("x.csv", "json"), ("x.jsonl", "table")])
def test_choose_format_refuses(output, fmt):
    with pytest.raises(UsageError, match=output):
        choose_format(output, fmt, False)
