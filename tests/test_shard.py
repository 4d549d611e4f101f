"""Scale-out: --shard I/N + tlearn merge, and torchrun runs of extract/predict, must give
byte for byte what a single process writes.

Byte identity needs the same floats. Two things change floats in the last bit on CPU:
the batch a sample is computed in (oneDNN picks convolution kernels by batch size; numpy's
GEMM treats a matrix's tail rows differently) and the number of torch threads. Shards are
whole batches of the single run's batches and predict scores batch by batch, so the first
is handled by design; the tests hold the second fixed (one thread everywhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tlearn
from tests.conftest import TINY, make_dataset
from tlearn.cli.app import app
from tlearn.core.errors import DataError, StrictModeError, TlearnError, UsageError
from tlearn.core.system import DistEnv, dist_env, threads_per_rank
from tlearn.scale.group import raise_first_failure, status_of
from tlearn.scale.ray import BatchExtractor
from tlearn.scale.shard import Shard, score_by_batch

REPO = Path(tlearn.__file__).resolve().parent.parent
BS = ["--batch-size", "4", "--workers", "0"]  # decoding workers change no float; they cost time


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


def _make_inputs(root: Path) -> Path:
    """3 classes x 5 images, one undecodable image (skipped while extracting) and one
    zero-byte file (skipped while scanning): 16 paths in 4 batches of 4."""
    make_dataset(root, n=5)
    (root / "grass" / "grass_99_bad.jpg").write_bytes(b"not an image at all")
    (root / "gravel" / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Extract as a single run and as 3 shards (one thread, like every run compared with
    them), and a model fitted on the features."""
    from typer.testing import CliRunner

    runner = CliRunner()
    base = tmp_path_factory.mktemp("shards")
    data = _make_inputs(base / "data")
    r = {"base": base, "data": data}
    for folder in ("single", "parts"):
        (base / folder).mkdir()
    with torch_threads(1):

        def extract(out, *extra):
            _ok(
                runner.invoke(app, ["extract", str(data), "-o", str(out), "-q", *TINY, *BS, *extra])
            )

        extract(base / "single" / "f.csv")
        for i in range(3):
            extract(base / "parts" / "f.csv", "--shard", f"{i}/3")
        fit = runner.invoke(
            app, ["fit", str(base / "single" / "f.csv"), "-o", str(base / "model"), "-q"]
        )
        _ok(fit)
    return r


def _parts(folder: Path, name="f.csv") -> list[Path]:
    return sorted(folder.glob(f"{name}.part-*-of-*[0-9]"))


# ----------------------------------------------------------------------------- shard plan


@pytest.mark.parametrize("total", [0, 1, 5, 16, 17, 64])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_shards_are_whole_batches_that_tile_the_input(total, count, batch):
    ranges = [Shard(i, count).range(total, batch) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, stop), (start, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert stop == start  # contiguous, no overlap: merge = concatenation
    # same batches as a single run (a shard left without inputs sits at the end)
    assert all(start % batch == 0 or start == stop == total for start, stop in ranges)
    sizes = [-(-(stop - start) // batch) for start, stop in ranges]  # batches per shard
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text, shard", [("0/2", (0, 2)), (" 3 / 4 ", (3, 4)), ("0/1", (0, 1))])
def test_shard_parse(text, shard):
    assert Shard.parse(text) == Shard(*shard)


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "0/0", "", "1/2/3"])
def test_shard_parse_refuses_bad_values(text):
    with pytest.raises(UsageError, match="--shard"):
        Shard.parse(text)


# ----------------------------------------------------------------------------- extract


def test_shards_merge_to_the_single_run_byte_for_byte(runs, runner, tmp_path):
    parts = _parts(runs["base"] / "parts")
    assert [p.name for p in parts] == [f"f.csv.part-0000{i}-of-00003" for i in range(3)]
    rows = [json.loads(Path(f"{p}.json").read_text())["rows"] for p in parts]
    assert all(n > 0 for n in rows) and sum(rows) == 15  # each shard did a share
    # a shell glob also matches the sidecars; the order of the arguments does not matter
    args = [str(p) for p in sorted(parts[0].parent.iterdir(), reverse=True)]
    out = tmp_path / "f.csv"
    r = _ok(runner.invoke(app, ["merge", *args, "-o", str(out)]))
    assert "merged 3 features parts into" in r.stderr and ": 15 rows" in r.stderr
    single = runs["base"] / "single"
    assert out.read_bytes() == (single / "f.csv").read_bytes()
    assert Path(f"{out}.json").read_bytes() == (single / "f.csv.json").read_bytes()
    skipped_list = Path(f"{out}.skipped.csv")
    assert skipped_list.read_bytes() == (single / "f.csv.skipped.csv").read_bytes()
    skipped = skipped_list.read_text()
    assert "empty.jpg" in skipped and "grass_99_bad.jpg" in skipped


def test_part_sidecar_records_shard_and_input_identity(runs):
    meta = json.loads(Path(f"{_parts(runs['base'] / 'parts')[1]}.json").read_text())
    s = meta["shard"]
    assert (s["index"], s["count"], s["start"], s["stop"], s["total"]) == (1, 3, 8, 12, 16)
    assert s["batch_size"] == 4 and len(s["inputs_sha256"]) == 64
    assert [p for p, _ in s["scan_skipped"]] == [str(runs["data"] / "gravel" / "empty.jpg")]
    assert [p for p, _ in s["skipped"]] == [str(runs["data"] / "grass" / "grass_99_bad.jpg")]
    assert meta["cut"]["model"] == "test_efficientnet" and meta["rows"] == 3


def _copy_parts(runs, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in _parts(runs["base"] / "parts"):
        shutil.copy(p, dest / p.name)
        shutil.copy(f"{p}.json", dest / f"{p.name}.json")
        out.append(dest / p.name)
    return out


def _edit_sidecar(part: Path, edit) -> None:
    side = Path(f"{part}.json")
    meta = json.loads(side.read_text())
    edit(meta)
    side.write_text(json.dumps(meta))


_TAMPER = {
    "other_pool": lambda m: m["cut"].update(pool="max"),
    "other_bs": lambda m: m["shard"].update(batch_size=2),
    "other_inputs": lambda m: m["shard"].update(inputs_sha256="0" * 64),
    "other_versions": lambda m: m["versions"].update(timm="0.0"),
    "incomplete": lambda m: m["shard"].pop("skipped"),
    "row_count": lambda m: m.update(rows=m["rows"] - 1),
}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "1 of 3 parts missing (shard 2"),
        ("duplicate", "shard 0 given twice"),
        ("other_pool", "another model, weights, layer or pool"),
        ("other_bs", "--batch-size"),
        ("other_inputs", "another input list"),
        ("other_versions", "tlearn/timm/torch version"),
        ("incomplete", "incomplete"),
        ("row_count", "rerun that shard"),
        ("not_a_part", "not a shard part"),
        ("vanished", "does not exist"),
    ],
)
def test_merge_refuses_parts_that_do_not_make_one_run(runs, runner, tmp_path, case, message):
    args = _copy_parts(runs, tmp_path / "p")
    if case in _TAMPER:
        _edit_sidecar(args[1], _TAMPER[case])
    elif case == "missing":
        args = args[:2]
    elif case == "duplicate":
        (tmp_path / "again").mkdir()
        shutil.copy(args[0], tmp_path / "again" / args[0].name)
        shutil.copy(f"{args[0]}.json", tmp_path / "again" / f"{args[0].name}.json")
        args.append(tmp_path / "again" / args[0].name)
    elif case == "not_a_part":
        args[2] = runs["base"] / "single" / "f.csv"
    elif case == "vanished":
        args[1].unlink()
    out = tmp_path / "merged.csv"
    r = runner.invoke(app, ["merge", *map(str, args), "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not Path(f"{out}.skipped.csv").exists()


def test_strict_shard_fails_alone_and_writes_nothing(runs, runner, tmp_path):
    # shard 2/4 holds the undecodable grass image; --strict fails it with exit 3 (as any
    # shard would fail if the scan had skipped something: here empty.jpg is skipped while
    # scanning, so use a folder without it)
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    (data / "gravel" / "empty.jpg").unlink()
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "f.csv"
    base = ["extract", str(data), "-o", str(out), "-q", "--strict", *TINY, *BS]
    bad = runner.invoke(app, [*base, "--shard", "1/2"])
    assert bad.exit_code == 3, bad.output
    assert "grass_99_bad.jpg" in bad.stderr
    _ok(runner.invoke(app, [*base, "--shard", "0/2"]))
    assert [p.name for p in sorted(out.parent.iterdir())] == [
        "f.csv.part-00000-of-00002",
        "f.csv.part-00000-of-00002.json",
    ]  # nothing of shard 1, so merge reports it missing
    r = runner.invoke(app, ["merge", *map(str, _parts(out.parent)), "-o", str(out)])
    assert r.exit_code == 1 and "1 of 2 parts missing" in r.stderr


def test_scan_skips_fail_every_strict_shard(runs, runner, tmp_path):
    out = tmp_path / "f.csv"
    r = runner.invoke(
        app, ["extract", str(runs["data"]), "-o", str(out), "--strict", *TINY, "--shard", "0/2"]
    )
    assert r.exit_code == 3 and "empty.jpg" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_a_shard(runs, runner, tmp_path):
    """An interrupted shard keeps its finished batches and appends the rest."""
    out = tmp_path / "f.csv"
    part = _parts(runs["base"] / "parts")[0]
    name = f"{out}.part-00000-of-00003"
    lines = part.read_bytes().split(b"\r\n")
    Path(f"{name}.partial").write_bytes(b"\r\n".join(lines[:5]) + b"\r\n")  # header + 1 batch
    meta = json.loads(Path(f"{part}.json").read_text())
    del meta["shard"]["skipped"], meta["rows"]
    Path(f"{name}.partial.json").write_text(json.dumps(meta))
    with torch_threads(1):
        _ok(
            runner.invoke(
                app,
                ["extract", str(runs["data"]), "-o", str(out), "-q", *TINY, *BS]
                + ["--shard", "0/3", "--resume"],
            )
        )
    assert Path(name).read_bytes() == part.read_bytes()
    assert not Path(f"{name}.partial").exists()


def test_resume_refuses_a_partial_from_another_range(runs, runner, tmp_path):
    out = tmp_path / "f.csv"
    part = _parts(runs["base"] / "parts")[2]  # rows of shard 2 ...
    name = f"{out}.part-00000-of-00003"  # ... offered to shard 0
    shutil.copy(part, f"{name}.partial")
    meta = json.loads(Path(f"{part}.json").read_text())
    Path(f"{name}.partial.json").write_text(json.dumps(meta))
    r = runner.invoke(
        app,
        ["extract", str(runs["data"]), "-o", str(out), *TINY, *BS, "--shard", "0/3", "--resume"],
    )
    assert r.exit_code == 1 and "without --resume" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "DATA", "-o", "-", "--shard", "0/2"], "output file"),
        (["extract", "DATA", "-o", "f.csv", "--shard", "2/2"], "0..N-1"),
        (["predict", "MODEL", "DATA", "--shard", "0/2"], "-o FILE"),
        (["predict", "MODEL", "DATA", "-o", "p.txt", "-f", "table", "--shard", "0/2"], "csv"),
        (["merge", "-o", "x.csv"], "Missing argument"),
    ],
)
def test_shard_usage_errors(runs, runner, tmp_path, monkeypatch, args, message):
    args = [
        {"DATA": str(runs["data"]), "MODEL": str(runs["base"] / "model")}.get(a, a) for a in args
    ]
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, [*args, *(TINY if args[0] == "extract" else [])])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_merge_has_help_with_example(runner):
    r = runner.invoke(app, ["merge", "--help"])
    assert r.exit_code == 0 and "Example" in r.stdout


# ----------------------------------------------------------------------------- predict


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_predict_shards_merge_to_the_single_run_byte_for_byte(runs, runner, tmp_path, fmt):
    model, data = runs["base"] / "model", runs["data"]
    opts = ["-f", fmt, "-q", "--all-scores", "-k", "2", *BS]
    for folder in ("s", "parts", "m"):
        (tmp_path / folder).mkdir()
    with torch_threads(1):
        _ok(
            runner.invoke(
                app, ["predict", str(model), str(data), "-o", str(tmp_path / "s" / "p")] + opts
            )
        )
        for i in range(3):
            _ok(
                runner.invoke(
                    app,
                    ["predict", str(model), str(data), "-o", str(tmp_path / "parts" / "p")]
                    + [*opts, "--shard", f"{i}/3"],
                )
            )
    parts = _parts(tmp_path / "parts", "p")
    assert len(parts) == 3
    _ok(runner.invoke(app, ["merge", *map(str, parts), "-o", str(tmp_path / "m" / "p")]))
    single, merged = tmp_path / "s", tmp_path / "m"
    assert (merged / "p").read_bytes() == (single / "p").read_bytes()
    assert (merged / "p.skipped.csv").read_bytes() == (single / "p.skipped.csv").read_bytes()
    assert (merged / "p").read_bytes().count(b"grass_04") == 1


def test_predict_from_features_csv_in_more_shards_than_batches(runs, runner, tmp_path):
    """15 rows in 4 batches of 4, 6 shards: the last two are empty and still merge."""
    model, features = str(runs["base"] / "model"), str(runs["base"] / "single" / "f.csv")
    opts = ["-f", "csv", "-q", *BS]
    for folder in ("s", "parts", "m"):
        (tmp_path / folder).mkdir()
    _ok(runner.invoke(app, ["predict", model, features, "-o", str(tmp_path / "s" / "p"), *opts]))
    for i in range(6):
        out = str(tmp_path / "parts" / "p")
        _ok(runner.invoke(app, ["predict", model, features, "-o", out, *opts, "--shard", f"{i}/6"]))
    parts = _parts(tmp_path / "parts", "p")
    assert [json.loads(Path(f"{p}.json").read_text())["rows"] for p in parts] == [4, 4, 4, 3, 0, 0]
    _ok(runner.invoke(app, ["merge", *map(str, parts), "-o", str(tmp_path / "m" / "p")]))
    assert (tmp_path / "m" / "p").read_bytes() == (tmp_path / "s" / "p").read_bytes()


def test_predict_parts_from_other_options_are_refused(runs, runner, tmp_path):
    model, data = runs["base"] / "model", runs["data"]
    out = tmp_path / "p.jsonl"
    for i, k in ((0, "1"), (1, "2")):
        _ok(
            runner.invoke(
                app,
                ["predict", str(model), str(data), "-o", str(out), "-f", "jsonl", "-q"]
                + ["-k", k, "--shard", f"{i}/2"],
            )
        )
    r = runner.invoke(app, ["merge", *map(str, _parts(tmp_path, "p.jsonl")), "-o", str(out)])
    assert r.exit_code == 1 and "--top-k/--all-scores" in r.stderr


def test_score_by_batch_is_independent_of_what_else_is_scored():
    """numpy's GEMM gives a row another last bit depending on the matrix's shape; scoring
    batch by batch removes that dependence (what predict relies on for shards)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(37, 64)).astype(np.float32)
    W = rng.normal(size=(3, 64)).astype(np.float32)

    def score(A):
        return A @ W.T

    batch_of = np.arange(37) // 8
    full = score_by_batch(score, X, batch_of, 3)
    for start in range(0, 37, 8):
        tail = score_by_batch(score, X[start:], batch_of[start:], 3)
        np.testing.assert_array_equal(tail, full[start:])
    assert score_by_batch(score, X[:0], batch_of[:0], 3).shape == (0, 3)


# ----------------------------------------------------------------------------- torchrun


def _torchrun_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TLEARN_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _torchrun(args, cwd, module=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", *(["-m", "tlearn"] if module else []), *args]
    return subprocess.run(
        cmd, cwd=cwd, env=_torchrun_env(), capture_output=True, text=True, timeout=240
    )


def test_torchrun_extract_equals_single_process_byte_for_byte(runs, tmp_path):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "f.csv"
    r = _torchrun(["extract", str(runs["data"]), "-o", str(out), *TINY, *BS], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    single = runs["base"] / "single"
    assert out.read_bytes() == (single / "f.csv").read_bytes()
    assert Path(f"{out}.json").read_bytes() == (single / "f.csv.json").read_bytes()
    skipped_list = Path(f"{out}.skipped.csv")
    assert skipped_list.read_bytes() == (single / "f.csv.skipped.csv").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "f.csv",
        "f.csv.json",
        "f.csv.skipped.csv",
    ]
    assert r.stderr.count("wrote 15 rows x 256 features") == 1  # only rank 0 reports
    assert r.stderr.count("2 image(s) skipped") == 1


RUN_CLI = """
import json, os, sys
from tlearn.cli.app import app
codes = [app(a, standalone_mode=False, prog_name="tlearn") for a in json.loads(sys.argv[1])]
with open(f"codes-{os.environ['RANK']}.json", "w") as f:
    json.dump(codes, f)
from tlearn.scale.group import exit_rank  # as tlearn.cli.main ends a torchrun rank
exit_rank(0)
"""


def test_torchrun_predict_and_strict(runs, runner, tmp_path):
    """One torchrun launch (they are slow to start), several tlearn commands in a row:
    predict to stdout and to a file equal a single process; --strict fails every rank
    with exit code 3 and writes nothing."""
    model, data = str(runs["base"] / "model"), str(runs["data"])
    opts = ["--all-scores", "-k", "2", *BS]
    single = tmp_path / "single"
    for folder in ("single", "dist", "strict"):
        (tmp_path / folder).mkdir()
    with torch_threads(1):
        for fmt in ("jsonl", "csv"):
            r = runner.invoke(
                app, ["predict", model, data, "-q", "-f", fmt, "-o", str(single / fmt), *opts]
            )
            _ok(r)
    strict_data = tmp_path / "data"
    shutil.copytree(runs["data"], strict_data)
    (strict_data / "gravel" / "empty.jpg").unlink()  # only rank 1's shard has a bad image
    commands = [
        ["predict", model, data, "-f", "jsonl", *opts],
        ["predict", model, data, "-f", "csv", "-o", "dist/csv", *opts],
        ["extract", str(strict_data), "-o", "strict/f.csv", "--strict", *TINY, *BS],
        ["extract", data, "-o", "-", *TINY],
        ["extract", data, "-o", "x.csv", "--shard", "0/2", *TINY],
    ]
    (tmp_path / "run_cli.py").write_text(RUN_CLI)
    r = _torchrun(["run_cli.py", json.dumps(commands)], tmp_path, module=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        codes = json.loads((tmp_path / f"codes-{rank}.json").read_text())
        assert codes == [None, None, 3, 2, 2]
    assert r.stdout == (single / "jsonl").read_text()  # printed once, by rank 0
    assert (tmp_path / "dist" / "csv").read_bytes() == (single / "csv").read_bytes()
    dist_list = tmp_path / "dist" / "csv.skipped.csv"
    assert dist_list.read_bytes() == (single / "csv.skipped.csv").read_bytes()
    assert r.stderr.count("error: --strict: 1 unreadable image(s)") == 1
    assert "grass_99_bad.jpg" in r.stderr
    assert list((tmp_path / "strict").iterdir()) == []  # rank 0 removed its finished part
    assert "-o - cannot be used" in r.stderr and "use one of them" in r.stderr
    assert not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------- rank plumbing


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
            DistEnv(3, 4, 1, 2),
        ),
        ({"RANK": "1", "WORLD_SIZE": "2"}, DistEnv(1, 2, 1, 2)),
    ],
)
def test_dist_env(environ, expected):
    assert dist_env(environ) == expected


@pytest.mark.parametrize(
    "environ", [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}]
)
def test_dist_env_refuses_nonsense(environ):
    with pytest.raises(UsageError, match="RANK"):
        dist_env(environ)


@pytest.mark.parametrize("command", ["evaluate", "merge", "layers"])  # fit: test_ddp_fit
def test_commands_that_do_not_shard_refuse_torchrun(runner, tmp_path, command):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    r = runner.invoke(app, [command, str(tmp_path), "-o", str(tmp_path / "x")], env=env)
    assert r.exit_code == 2, r.output
    assert f"tlearn {command} does not run under torchrun" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_threads_per_rank():
    env = DistEnv(0, 4, 0, 2)
    assert threads_per_rank(env, {"TLEARN_NUM_THREADS": "3"}) == 3
    assert 1 <= threads_per_rank(env, {}) <= max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(UsageError, match="TLEARN_NUM_THREADS"):
        threads_per_rank(env, {"TLEARN_NUM_THREADS": "0"})


def test_a_failing_rank_fails_every_rank_with_its_error():
    ok = status_of(None)
    strict = status_of(StrictModeError("--strict: 1 unreadable image(s), nothing written: x"))
    raise_first_failure([ok, ok], rank=0, own=None)  # nothing failed
    with pytest.raises(StrictModeError, match="unreadable") as e:
        raise_first_failure([ok, strict], rank=0, own=None)
    assert e.value.exit_code == 3
    own = DataError("mine")
    with pytest.raises(DataError, match="mine"):
        raise_first_failure([ok, strict], rank=1, own=own)
    bug = status_of(KeyError("boom"))
    with pytest.raises(TlearnError, match="rank 1 failed: unexpected KeyError"):
        raise_first_failure([ok, bug], rank=0, own=None)


# ----------------------------------------------------------------------------- Ray & co


def test_batch_extractor_matches_tlearn_extract(runs, tmp_path):
    import pandas as pd

    single = pd.read_csv(runs["base"] / "single" / "f.csv")
    fn = BatchExtractor(model="test_efficientnet", weights="none")
    paths = [str(p) for p in sorted(runs["data"].rglob("*.*")) if p.stat().st_size]
    with torch_threads(1):
        got = fn(
            {"path": np.asarray(paths[:4] + [str(runs["data"] / "grass" / "grass_99_bad.jpg")])}
        )
    assert got["features"].shape == (5, 256) and got["features"].dtype == np.float32
    assert list(got["skipped"][:4]) == [""] * 4 and got["skipped"][4]
    assert np.isnan(got["features"][4]).all()
    # Same images as the first batch of the single run: same batch, same bits.
    first = single[single["path"].isin(paths[:4])]
    assert list(first["path"]) == paths[:4]
    np.testing.assert_array_equal(got["features"][:4], first.iloc[:, 2:].to_numpy(np.float32))


def test_ray_example(runs):
    ray = pytest.importorskip("ray", reason="ray is optional: pip install 'ray[data]'")
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("ray_example", REPO / "docs" / "ray_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    single = pd.read_csv(runs["base"] / "single" / "f.csv")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        ds = example.extract_with_ray(
            single["path"], model="test_efficientnet", weights="none", batch_size=4, concurrency=1
        )
        rows = sorted(ds.take_all(), key=lambda row: row["path"])
    finally:
        ray.shutdown()
    expected = single.sort_values("path")
    assert [row["path"] for row in rows] == list(expected["path"])
    assert all(row["skipped"] == "" for row in rows)
    # Ray picks its own batches, so only last-bit float differences are allowed here.
    got = np.stack([row["features"] for row in rows])
    np.testing.assert_allclose(got, expected.iloc[:, 2:].to_numpy(np.float32), rtol=1e-4, atol=1e-6)
