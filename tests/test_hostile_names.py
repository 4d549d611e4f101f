"""Hostile names: rich markup in paths, class names, model and cache paths prints
literally in every command's output; file names that are not UTF-8 never crash."""

from __future__ import annotations

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
