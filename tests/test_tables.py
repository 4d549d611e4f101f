"""Feature tables in every format (CSV, Parquet, NPY): the same numbers, the same models,
--resume and --shard/merge per format, and a table bound to its sidecar (rows, sha256)
so that a table and a sidecar that were not written together are refused."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tlearn.jobs.extract as extract_job
from tests.conftest import TINY, make_dataset
from tlearn.cli.app import app
from tlearn.core.options import RunOptions
from tlearn.features.formats import parquet_format
from tlearn.features.formats.common import complete_csv_rows
from tlearn.features.formats.npy_format import npy_header
from tlearn.features.table import partial_path, read_table

FORMATS = ["csv", "parquet", "npy"]
BS = ["--batch-size", "4", "--workers", "0"]


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _parts(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f"{name}.part-*-of-*[0-9]"))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """One data folder extracted to each format (single run and 3 shards), and a model."""
    from typer.testing import CliRunner

    runner = CliRunner()
    base = tmp_path_factory.mktemp("tables")
    data = base / "data"
    make_dataset(data, n=5)
    (data / "grass" / "grass_99_bad.jpg").write_bytes(b"not an image")
    for folder in ("single", *(f"parts-{fmt}" for fmt in FORMATS)):
        (base / folder).mkdir()  # tlearn never creates -o's folder
    with torch_threads(1):
        for fmt in FORMATS:
            args = ["extract", str(data), "-q", *TINY, *BS]
            _ok(runner.invoke(app, [*args, "-o", str(base / "single" / f"f.{fmt}")]))
            for i in range(3):
                out = str(base / f"parts-{fmt}" / f"f.{fmt}")
                _ok(runner.invoke(app, [*args, "-o", out, "--shard", f"{i}/3"]))
        _ok(
            runner.invoke(app, ["fit", str(base / "single" / "f.csv"), "-o", str(base / "m"), "-q"])
        )
    return {"base": base, "data": data, "model": base / "m"}


def _single(tables, fmt: str) -> Path:
    return tables["base"] / "single" / f"f.{fmt}"


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_binary_tables_hold_exactly_the_csvs_numbers(tables, fmt):
    csv, other = read_table(_single(tables, "csv")), read_table(_single(tables, fmt))
    assert len(csv.paths) == 15 and csv.X.dtype == other.X.dtype == np.float32
    np.testing.assert_array_equal(other.X, csv.X)
    assert other.paths == csv.paths and other.labels == csv.labels
    assert other.meta["cut"] == csv.meta["cut"] and other.meta["rows"] == 15
    assert other.meta["table"]["format"] == fmt and csv.meta["table"]["format"] == "csv"


def test_other_tools_read_the_binary_tables(tables):
    """pandas.read_parquet gives read_csv's frame (float32 columns f0..fN); numpy.load the
    matrix; the Parquet schema carries the sidecar's metadata."""
    import pyarrow.parquet as pq

    df = pd.read_csv(_single(tables, "csv"), keep_default_na=False)
    pq_df = pd.read_parquet(_single(tables, "parquet"))
    assert list(pq_df.columns) == list(df.columns)
    assert (pq_df.dtypes.iloc[2:] == np.float32).all()
    np.testing.assert_array_equal(pq_df.iloc[:, 2:].to_numpy(), df.iloc[:, 2:].to_numpy(np.float32))
    assert pq_df["path"].tolist() == df["path"].tolist()
    meta = json.loads(pq.read_schema(_single(tables, "parquet")).metadata[b"tlearn"])
    side = json.loads(Path(f"{_single(tables, 'parquet')}.json").read_text())
    assert meta == {k: v for k, v in side.items() if k not in ("rows", "table")}
    X = np.load(_single(tables, "npy"), allow_pickle=False)
    np.testing.assert_array_equal(X, df.iloc[:, 2:].to_numpy(np.float32))
    side = json.loads(Path(f"{_single(tables, 'npy')}.json").read_text())
    assert side["paths"] == df["path"].tolist()
    assert side["labels"] == df["label"].tolist()


def test_npy_header_is_numpys(tmp_path):
    for shape in [(0, 3), (5, 7), (12345, 1280), (10**19, 2)]:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        assert npy_header(*shape) == buf.getvalue()
    assert len(npy_header(0, 1280)) == len(npy_header(10**20, 1280))  # rewritten in place


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_fit_on_any_format_writes_the_same_model(tables, runner, tmp_path, fmt):
    _ok(runner.invoke(app, ["fit", str(_single(tables, fmt)), "-o", str(tmp_path / "m"), "-q"]))
    got, want = tmp_path / "m", tables["model"]
    assert (got / "head.safetensors").read_bytes() == (want / "head.safetensors").read_bytes()
    configs = [json.loads((m / "config.json").read_text()) for m in (got, want)]
    for c in configs:
        c.pop("created", None)
        for row in c["head"].get("cv", []):  # timings
            row.pop("fit_seconds", None)
    assert configs[0] == configs[1]


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_predict_and_evaluate_read_any_format(tables, runner, fmt):
    model = str(tables["model"])
    got, want = (
        _ok(runner.invoke(app, ["predict", model, str(_single(tables, f)), "-f", "csv"])).stdout
        for f in (fmt, "csv")
    )
    assert got == want and len(got.splitlines()) == 16
    # a table is read row-major: the scores are those of the images themselves
    from_images = runner.invoke(app, ["predict", model, str(tables["data"]), "-f", "csv"])
    assert from_images.stdout == want
    got, want = (
        json.loads(
            _ok(runner.invoke(app, ["evaluate", model, str(_single(tables, f)), "--json"])).stdout
        )
        for f in (fmt, "csv")
    )
    assert got == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_sweep_says_it_needs_images_not_a_table(tables, runner, fmt):
    r = runner.invoke(app, ["sweep", str(_single(tables, fmt)), *TINY])
    assert r.exit_code == 2 and "features table, which holds one cut" in r.stderr


def test_string_columns_are_built_without_pandas():
    from tlearn.features.formats.parquet_format import string_array

    values = ["a", None, 'straße, "q"', "", "日本"]
    assert string_array(values).to_pylist() == values
    assert string_array([]).to_pylist() == []


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_a_writer_thread_writes_the_same_bytes(tables, runner, tmp_path, monkeypatch, fmt):
    """On 8+ cores binary tables are written by a thread beside extraction (forced here)."""
    import tlearn.features.table as table

    assert table.background_writes(table.table_format("f.parquet"), cores=16)
    assert not table.background_writes(table.table_format("f.csv"), cores=16)
    assert not table.background_writes(table.table_format("f.npy"), cores=2)
    monkeypatch.setattr(table, "background_writes", lambda fmt: True)
    out = tmp_path / f"f.{fmt}"
    with torch_threads(1):
        _ok(runner.invoke(app, ["extract", str(tables["data"]), "-o", str(out), "-q", *TINY, *BS]))
    assert out.read_bytes() == _single(tables, fmt).read_bytes()
    assert Path(f"{out}.json").read_bytes() == Path(f"{_single(tables, fmt)}.json").read_bytes()


def test_stdout_stays_csv(runner, tables):
    r = _ok(runner.invoke(app, ["extract", str(tables["data"] / "gravel"), "-o", "-", "-q", *TINY]))
    assert r.stdout.startswith("path,label,f0,")
    assert len(pd.read_csv(io.StringIO(r.stdout))) == 5


def test_extract_json_reports_the_stages(runner, tables, tmp_path):
    out = tmp_path / "f.parquet"
    r = _ok(runner.invoke(app, ["extract", str(tables["data"]), "-o", str(out), "--json", *TINY]))
    res = json.loads(r.stdout)
    assert res["rows"] == 15 and res["format"] == "parquet" and res["skipped"] == 1
    assert res["startup_seconds"] > 0 and res["run_seconds"] > 0 and res["images_per_second"] > 0
    assert {"start-up", "model", "output"} <= set(res["engine"]["stages"])
    assert res["engine"]["decode"] == "cpu"
    r = runner.invoke(app, ["extract", str(tables["data"]), "-o", "-", "--json", *TINY])
    assert r.exit_code == 2 and "--json" in r.stderr


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_merge_to_the_single_run_in_every_format(tables, runner, tmp_path, fmt):
    parts = _parts(tables["base"] / f"parts-{fmt}", f"f.{fmt}")
    assert len(parts) == 3
    out = tmp_path / f"f.{fmt}"
    r = _ok(runner.invoke(app, ["merge", *map(str, parts), "-o", str(out)]))
    assert ": 15 rows" in r.stderr
    single = _single(tables, fmt)
    assert out.read_bytes() == single.read_bytes()
    assert Path(f"{out}.json").read_bytes() == Path(f"{single}.json").read_bytes()


def test_parquet_shards_merge_byte_for_byte_over_many_row_groups(
    runner, tables, tmp_path, monkeypatch
):
    """Row groups of a fixed size: the merged file groups rows as the single run did."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(parquet_format, "row_group_rows", lambda dim: 3)
    args = ["extract", str(tables["data"]), "-q", *TINY, *BS]
    with torch_threads(1):
        for folder in ("single", "merged"):
            (tmp_path / folder).mkdir()
        _ok(runner.invoke(app, [*args, "-o", str(tmp_path / "single" / "f.parquet")]))
        for i in range(2):
            _ok(runner.invoke(app, [*args, "-o", str(tmp_path / "p.parquet"), "--shard", f"{i}/2"]))
    parts = _parts(tmp_path, "p.parquet")
    out = tmp_path / "merged" / "f.parquet"  # the single run's name: its sidecar names it
    _ok(runner.invoke(app, ["merge", *map(str, parts), "-o", str(out)]))
    assert pq.ParquetFile(out).metadata.num_row_groups == 5  # 15 rows in groups of 3
    assert out.read_bytes() == (tmp_path / "single" / "f.parquet").read_bytes()


def test_merge_refuses_another_format_for_the_output(tables, runner, tmp_path):
    parts = _parts(tables["base"] / "parts-parquet", "f.parquet")
    r = runner.invoke(app, ["merge", *map(str, parts), "-o", str(tmp_path / "f.csv")])
    assert r.exit_code == 2 and "-o must end in .parquet" in r.stderr


def _remove_a_row(fmt: str, part: Path) -> None:
    """A part with one row less than its sidecar says (what once merged silently)."""
    if fmt == "csv":
        lines = part.read_bytes().split(b"\r\n")
        part.write_bytes(b"\r\n".join(lines[:-2] + [b""]))
    elif fmt == "npy":
        X = np.load(part)
        with open(part, "wb") as f:
            np.save(f, X[:-1])
    else:
        import pyarrow.parquet as pq

        t = pq.read_table(part)
        pq.write_table(t.slice(0, t.num_rows - 1), part)


@pytest.mark.parametrize(
    "fmt, old_sidecar",
    [("csv", False), ("parquet", False), ("npy", False), ("csv", True)],
    ids=["csv", "parquet", "npy", "csv-older-sidecar"],  # older tlearn wrote only CSV
)
def test_merge_refuses_a_part_with_rows_removed(tables, runner, tmp_path, fmt, old_sidecar):
    parts = []
    for p in _parts(tables["base"] / f"parts-{fmt}", f"f.{fmt}"):
        shutil.copy(p, tmp_path / p.name)
        shutil.copy(f"{p}.json", tmp_path / f"{p.name}.json")
        parts.append(tmp_path / p.name)
    _remove_a_row(fmt, parts[1])
    if old_sidecar:  # written before tables were bound: the rows are still counted
        side = Path(f"{parts[1]}.json")
        meta = json.loads(side.read_text())
        del meta["table"]
        side.write_text(json.dumps(meta))
    out = tmp_path / f"merged.{fmt}"
    r = runner.invoke(app, ["merge", *map(str, parts), "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "not written together" in r.stderr and parts[1].name in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- binding


def _swap_in_another_pool(tables, tmp_path, fmt: str) -> Path:
    """A max-pooled table under the avg-pooled table's sidecar: what a kill between the
    two renames once left behind (the same feature size, so only the binding tells)."""
    dest = tmp_path / f"f.{fmt}"
    shutil.copy(_single(tables, fmt), dest)
    shutil.copy(f"{_single(tables, fmt)}.json", f"{dest}.json")
    (tmp_path / "max").mkdir()
    other = tmp_path / "max" / f"f.{fmt}"
    from typer.testing import CliRunner

    r = CliRunner().invoke(
        app, ["extract", str(tables["data"]), "-o", str(other), "--pool", "max", "-q", *TINY]
    )
    _ok(r)
    shutil.copy(other, dest)
    return dest


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_table_that_does_not_match_its_sidecar_is_refused(tables, runner, tmp_path, fmt):
    table = _swap_in_another_pool(tables, tmp_path, fmt)
    model = str(tables["model"])
    for args in (
        ["fit", str(table), "-o", str(tmp_path / "m")],
        ["predict", model, str(table)],
        ["evaluate", model, str(table)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert "does not match its sidecar" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sidecar_from_an_older_tlearn_is_read_with_a_warning(tables, runner, tmp_path, fmt):
    table = tmp_path / f"f.{fmt}"
    shutil.copy(_single(tables, fmt), table)
    meta = json.loads(Path(f"{_single(tables, fmt)}.json").read_text())
    del meta["table"]
    Path(f"{table}.json").write_text(json.dumps(meta))
    r = _ok(runner.invoke(app, ["fit", str(table), "-o", str(tmp_path / "m")]))
    assert "written by an older tlearn: not verified" in r.stderr
    assert (tmp_path / "m" / "head.safetensors").read_bytes() == (
        tables["model"] / "head.safetensors"
    ).read_bytes()
    meta["rows"] = 14  # but a row count that does not match is still refused
    Path(f"{table}.json").write_text(json.dumps(meta))
    r = runner.invoke(app, ["evaluate", str(tables["model"]), str(table)])
    assert r.exit_code == 1 and "holds 15 rows but its sidecar" in r.stderr


def test_a_table_read_as_another_format_is_refused(tables, runner, tmp_path):
    table = tmp_path / "f.csv"
    shutil.copy(_single(tables, "parquet"), table)
    shutil.copy(f"{_single(tables, 'parquet')}.json", f"{table}.json")
    r = runner.invoke(app, ["fit", str(table), "-o", str(tmp_path / "m")])
    assert r.exit_code == 1 and "describes a parquet table" in r.stderr


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_a_table_without_its_sidecar_is_refused(tables, runner, tmp_path, fmt):
    table = tmp_path / f"f.{fmt}"
    shutil.copy(_single(tables, fmt), table)
    r = runner.invoke(app, ["fit", str(table), "-o", str(tmp_path / "m")])
    assert r.exit_code == 1 and "has no sidecar" in r.stderr


# ----------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, batches: int) -> None:
    real = extract_job.write_table

    def write_table(stream, *args, **kwargs):
        def cut():
            for i, b in enumerate(stream):
                if i == batches:
                    raise KeyboardInterrupt
                yield b

        return real(cut(), *args, **kwargs)

    monkeypatch.setattr(extract_job, "write_table", write_table)


def _extract(data, out, **kw):
    run = RunOptions(batch_size=4, workers=0)
    return extract_job.extract(
        [data], out, model="test_efficientnet", weights="none", run=run, **kw
    )


def _damage_tail(fmt: str, partial: Path) -> None:
    """What a kill in the middle of a batch leaves: a half-written last row."""
    if fmt == "csv":
        partial.write_bytes(partial.read_bytes()[:-50])
    else:
        partial.write_bytes(partial.read_bytes()[:-50])  # half a row of numbers
        rows = Path(f"{partial}.rows")
        rows.write_bytes(rows.read_bytes() + b'"/half/written')


@pytest.mark.parametrize(
    "fmt, damaged, thread",
    [(f, d, False) for f in FORMATS for d in (False, True)] + [("parquet", True, True)],
    ids=lambda v: {False: "-", True: "+"}.get(v, v) if isinstance(v, bool) else v,
)
def test_resume_keeps_the_finished_rows_in_every_format(
    tables, tmp_path, monkeypatch, fmt, damaged, thread
):
    """fmt, damaged (a half-written last row, as a kill leaves), thread (a writer thread)"""
    import tlearn.features.table as table

    out = tmp_path / f"f.{fmt}"
    _interrupt_after(monkeypatch, 2)
    monkeypatch.setattr(table, "background_writes", lambda fmt: thread)
    with torch_threads(1), pytest.raises(KeyboardInterrupt):
        _extract(tables["data"], out)
    monkeypatch.undo()
    partial = partial_path(out)
    assert partial.is_file() and not out.exists()
    if damaged:
        _damage_tail(fmt, partial)
    with torch_threads(1):
        res = _extract(tables["data"], out, resume=True)
    assert res.rows == 15
    assert res.engine["computed"] + res.engine["cached"] == 15 - (7 if damaged else 8)
    assert out.read_bytes() == _single(tables, fmt).read_bytes()
    assert Path(f"{out}.json").read_bytes() == Path(f"{_single(tables, fmt)}.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"f.{fmt}",
        f"f.{fmt}.json",
        f"f.{fmt}.skipped.csv",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_refuses_a_partial_from_another_input_list(tables, tmp_path, monkeypatch, fmt):
    """The same images, labelled otherwise by a --labels file: the kept rows would carry
    the old labels, so only the input list's hash can tell."""
    from tlearn.core.errors import DataError

    out = tmp_path / f"f.{fmt}"
    images = sorted(p for p in tables["data"].rglob("*.*"))
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"path": [str(p) for p in images], "label": "road"}).to_csv(labels, index=False)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _extract(tables["data"], out, labels_csv=labels)
    monkeypatch.undo()
    assert partial_path(out).is_file()
    with pytest.raises(DataError, match="another list of inputs"):
        _extract(tables["data"], out, resume=True)


def test_complete_csv_rows_handles_quoted_newlines_and_cut_rows():
    data = b'path,label\r\n"a\nb.jpg",x\r\nc.jpg,y\r\n"d.jpg",'
    rows, ends = complete_csv_rows(data, 2)
    assert rows == [["path", "label"], ["a\nb.jpg", "x"], ["c.jpg", "y"]]
    assert data[: ends[-1]].endswith(b"c.jpg,y\r\n")
    assert complete_csv_rows(b'p,l\r\n"unfinished', 2)[0] == [["p", "l"]]
