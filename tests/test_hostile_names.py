"""Hostile names: rich markup in paths, class names, model and cache paths prints
literally in every command's output; file names that are not UTF-8 never crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CLASS_COLORS, TINY, draw

# A class folder `[bold]` would turn bold and vanish; `k[` + a file `red]_0.jpg` make the
# path `.../k[/red]_0.jpg`, a closing tag without an opening one (MarkupError).
CLASSES = {"[bold]": "asphalt", "k[": "gravel"}


def hostile_dataset(root):
    for k, (name, color) in enumerate(CLASSES.items()):
        for i in range(5):
            stem = "red]" if name == "k[" else "[i]x"
            draw(root / name / f"{stem}_{i}.jpg", CLASS_COLORS[color], seed=k * 10 + i)
    (root / "[bold]" / "[red]bad.jpg").write_bytes(b"")  # zero bytes: in the skipped list
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A dataset, a model directory `[m]model` fitted on it, a cache dir with brackets."""
    import os

    from typer.testing import CliRunner

    from tlearn.cli.app import app

    base = tmp_path_factory.mktemp("hostile")
    data = hostile_dataset(base / "[d]data")
    model = base / "[m]model"
    old = os.environ.get("TLEARN_CACHE_DIR")
    os.environ["TLEARN_CACHE_DIR"] = str(base / "[c]cache")
    try:
        res = CliRunner().invoke(
            app, ["fit", str(data), "-o", str(model), "--val", str(data), *TINY]
        )
        assert res.exit_code == 0, res.output
        yield base, data, model, res.output
    finally:
        if old is None:
            os.environ.pop("TLEARN_CACHE_DIR", None)
        else:
            os.environ["TLEARN_CACHE_DIR"] = old


def _args(which, base, data, model):
    img = str(data / "k[" / "red]_0.jpg")
    return {
        "extract": ["extract", str(data), "-o", str(base / "[o]f.csv"), *TINY],
        "extract-stdout": ["extract", str(data), "-o", "-", *TINY],
        "predict": ["predict", str(model), str(data), "-f", "table"],
        "predict-file": ["predict", str(model), str(data), "-o", str(base / "[p]p.csv")],
        "evaluate": ["evaluate", str(model), str(data), "-o", str(base / "[e]eval")],
        "sweep": ["sweep", str(data), "--layer", "-1,-2", "--folds", "2", *TINY],
        "audit": ["audit", str(data), "-o", str(base / "[a]audit"), "--folds", "2", *TINY],
        "heatmap": ["heatmap", str(model), img, "-o", str(base / "[h]heat")],
        "cache-info": ["cache", "info"],
    }[which]


@pytest.mark.parametrize(
    "which",
    ["extract", "extract-stdout", "predict", "predict-file", "evaluate", "sweep", "audit",
     "heatmap", "cache-info"],
)  # fmt: skip
def test_markup_in_names_prints_literally(hostile, runner, which):
    from tlearn.cli.app import app

    base, data, model, fit_output = hostile
    res = runner.invoke(app, _args(which, base, data, model))
    assert res.exit_code == 0, res.output
    assert "MarkupError" not in res.output
    text = res.output
    shown = {
        "extract": ["[red]bad.jpg", "[o]f.csv"],
        "extract-stdout": ["[red]bad.jpg", "k[/red]_0.jpg"],
        "predict": ["k[/red]_0.jpg", "[bold]"],
        "predict-file": ["[p]p.csv", "[red]bad.jpg"],
        "evaluate": ["[bold]", "[e]eval"],
        "sweep": ["[red]bad.jpg"],
        "audit": ["[a]audit", "[bold]"],
        "heatmap": ["k[/red]_0.jpg", "[h]heat", "k["],
        "cache-info": ["[c]cache"],
    }[which]
    for s in shown:
        assert s in text, (s, text)


def test_fit_prints_markup_literally(hostile):
    _, _, _, output = hostile
    for s in ("[bold]", "[m]model", "[red]bad.jpg"):
        assert s in output, (s, output)


@pytest.mark.parametrize(
    "args",
    [["layers", "[x]nosuch"], ["layers", "test_efficientnet", "--plot", "[q]/x.png"],
     ["predict", "[x]nomodel", "."], ["extract", "[x]nofolder", "-o", "f.csv"]],
)  # fmt: skip
def test_markup_in_errors_prints_literally(runner, tmp_path, monkeypatch, args):
    from tlearn.cli.app import app

    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert "unexpected" not in res.output, res.output
    assert "[x]" in res.output or "[q]" in res.output, res.output


# --- file names that are not UTF-8 ---------------------------------------------------------


def test_printable_escapes_only_bytes_that_are_not_utf8():
    import os

    from tlearn.core.names import is_utf8, printable

    assert printable("plain/é[x].jpg") == "plain/é[x].jpg"
    assert printable(os.fsdecode(b"d/\xff\xfe.jpg")) == "d/\\xff\\xfe.jpg"
    assert printable(os.fsdecode(b"gr\xe9vel")) == "gr\\xe9vel"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate that is not an escaped byte
    assert not is_utf8(os.fsdecode(b"\xff")) and is_utf8("é")


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory):
    """Two classes, one image named b'\\xff\\xfe.jpg' and a class folder b'gr\\xe9vel'."""
    import os
    import shutil

    base = tmp_path_factory.mktemp("undecodable")
    data = base / "data"
    for k, name in enumerate(("asphalt", "grass")):
        for i in range(4):
            draw(data / name / f"{name}_{i}.jpg", CLASS_COLORS[name], seed=k * 10 + i)
    bad = os.fsdecode(os.fsencode(data / "asphalt") + b"/\xff\xfe.jpg")
    shutil.copy(data / "asphalt" / "asphalt_0.jpg", bad)
    folder = os.fsdecode(os.fsencode(data) + b"/gr\xe9vel")
    os.mkdir(folder)
    shutil.copy(data / "grass" / "grass_0.jpg", os.path.join(folder, "x.jpg"))
    return base, data


@pytest.mark.parametrize(
    "which",
    ["extract.csv", "extract.parquet", "extract.npy", "extract-stdout", "fit", "predict.csv",
     "predict.tsv", "predict.json", "predict.jsonl", "predict-table", "predict-named",
     "evaluate"],
)  # fmt: skip
def test_names_not_utf8_are_skipped_with_a_reason(undecodable, runner, fitted_model, which):
    import os

    from tlearn.cli.app import app

    base, data = undecodable
    out = base / which
    command, _, ext = which.partition(".")
    args = {
        "extract": ["extract", str(data), "-o", str(out), *TINY],
        "extract-stdout": ["extract", str(data), "-o", "-", *TINY],
        "fit": ["fit", str(data), "-o", str(out), *TINY],
        "predict": ["predict", str(fitted_model), str(data), "-o", str(out)],
        "predict-table": ["predict", str(fitted_model), str(data), "-f", "table"],
        "predict-named": [
            "predict", str(fitted_model), os.fsdecode(os.fsencode(data) + b"/asphalt/\xff\xfe.jpg"),
            str(data / "asphalt" / "asphalt_1.jpg"),
        ],
    }.get(command)  # fmt: skip
    if command == "evaluate":  # a model of these classes (the fixture's model has others)
        fit = ["fit", str(data), "-o", str(base / "m-eval"), *TINY]
        assert runner.invoke(app, fit).exit_code == 0
        args = ["evaluate", str(base / "m-eval"), str(data), "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Unicode" not in res.output and "\udcff" not in res.output
    assert "\\xff\\xfe.jpg: file name is not valid UTF-8" in res.output
    skipped = {
        "extract": f"{out}.skipped.csv",
        "predict": f"{out}.skipped.csv",
        "fit": out / "skipped.csv",
        "evaluate": out / "skipped.csv",
    }.get(command)
    if skipped is not None:
        text = open(skipped, encoding="utf-8").read()
        assert "\\xff\\xfe.jpg,file name is not valid UTF-8" in text
        assert "gr\\xe9vel" in text


# --- one rule when nothing could be read: exit 3, one line, nothing written -----------------


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory):
    """The fixture model's classes, each with images that cannot be read: decode failures
    (text named .jpg) in one folder, zero-byte files in another."""
    base = tmp_path_factory.mktemp("unreadable")
    for kind in ("decode", "zero"):
        for name in ("asphalt", "gravel", "grass"):
            (base / kind / name).mkdir(parents=True)
            (base / kind / name / "1.jpg").write_bytes(b"" if kind == "zero" else b"not an image")
    return base


@pytest.mark.parametrize("kind", ["decode", "zero"])
@pytest.mark.parametrize(
    "command",
    ["extract", "extract-stdout", "fit", "predict", "predict-stdout", "evaluate", "sweep",
     "audit", "heatmap"],
)  # fmt: skip
def test_nothing_readable_exits_3_with_one_line(unreadable, fitted_model, runner, kind, command):
    from tlearn.cli.app import app

    data, out = unreadable / kind, unreadable / f"{kind}-{command}"
    m = str(fitted_model)
    args = {
        "extract": ["extract", str(data), "-o", f"{out}.csv", *TINY],
        "extract-stdout": ["extract", str(data), "-o", "-", *TINY],
        "fit": ["fit", str(data), "-o", str(out), *TINY],
        "predict": ["predict", m, str(data), "-o", f"{out}.csv"],
        "predict-stdout": ["predict", m, str(data), "-f", "csv"],
        "evaluate": ["evaluate", m, str(data), "-o", str(out)],
        "sweep": ["sweep", str(data), "--layer", "-1", *TINY],
        "audit": ["audit", str(data), "-o", str(out), *TINY],
        "heatmap": ["heatmap", m, str(data), "-o", str(out)],
    }[command]
    res = runner.invoke(app, [*args, "-q"])
    assert res.exit_code == 3, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing could be read: all 3 image(s)" in errors[0], res.output
    assert "path,label" not in res.stdout and "path,prediction" not in res.stdout
    assert not out.exists() and not Path(f"{out}.csv").exists()  # no header-only table
    assert not Path(f"{out}.csv.json").exists() and not Path(f"{out}.csv.partial").exists()
    if command in ("extract", "predict"):  # with -o FILE the list is written and named
        assert f"the list is in {out}.csv.skipped.csv" in errors[0]
        assert "1.jpg" in Path(f"{out}.csv.skipped.csv").read_text()


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "zero-byte file"),
        ("text.jpg", b"not an image at all", "not a recognised image format"),
        ("eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a recognised image format"),
    ],
)
def test_strict_stdout_fails_before_any_row_on_scan_problems(
    image_folder, runner, name, content, reason
):
    """--strict -o -: what the scan can see (an empty file, first bytes of no supported
    format) fails before any row reaches stdout."""
    from tlearn.cli.app import app

    (image_folder / "gravel" / name).write_bytes(content)
    res = runner.invoke(app, ["extract", str(image_folder), "-o", "-", "--strict", *TINY])
    assert res.exit_code == 3, res.output
    assert "path,label" not in res.stdout and "asphalt_00" not in res.stdout
    assert f"{name} ({reason}" in res.output


def test_strict_stdout_decode_failure_ends_the_stream_with_exit_3(image_folder, runner):
    """A failure only decoding finds (a JPEG cut short) ends the stream with exit 3 and a
    line on stderr."""
    from tlearn.cli.app import app

    whole = (image_folder / "gravel" / "gravel_00.jpg").read_bytes()
    (image_folder / "gravel" / "zz.jpg").write_bytes(whole[:200])
    res = runner.invoke(app, ["extract", str(image_folder), "-o", "-", "--strict", *TINY])
    assert res.exit_code == 3, res.output
    assert "zz.jpg (" in res.output
