"""Warm runs (tlearn.warm): once a cut has been exported, extract / fit / predict /
evaluate on the CPU run without importing torch, timm or torchvision, and give exactly
the output of a cold run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, draw, make_dataset
from PIL import Image

from tlearn.data.pixels import PilSteps, describe

HEAVY = ("torch", "timm", "torchvision")

RUN = f"""
import sys
from tlearn.cli import main
sys.argv = ["tlearn", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code or 0
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def tlearn(args, cache: Path, **env) -> tuple[int, str, str, list[str]]:
    """Run the CLI in a fresh interpreter: (exit code, stdout, stderr, heavy modules)."""
    full_env = {**os.environ, "TLEARN_CACHE_DIR": str(cache), **env}
    p = subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )
    heavy_line = [ln for ln in p.stderr.splitlines() if ln.startswith("HEAVY=")]
    heavy = [m for m in heavy_line[-1][6:].split(",") if m] if heavy_line else []
    return p.returncode, p.stdout, p.stderr, heavy


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- pixels


def _timm_steps(cfg):
    from tlearn.runtime.transforms import timm_eval_transform

    return timm_eval_transform(cfg).transforms[:-2]


CONFIGS = [
    # the default backbone's, a test model's, and unusual crops / filters
    {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875},
    {"input_size": [3, 160, 160], "interpolation": "bicubic", "crop_pct": 0.95},
    {"input_size": [3, 64, 64], "interpolation": "bilinear", "crop_pct": 1.0},
    {"input_size": [3, 96, 96], "interpolation": "bicubic", "crop_pct": 0.9},
]
SIZES = [(250, 250), (500, 375), (375, 500), (100, 60), (224, 224), (257, 1000), (31, 17)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['input_size'][1]}-{c['crop_pct']}")
def test_pil_steps_are_pixel_identical_to_timms_transform(cfg):
    cfg = {**cfg, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_mode": "center"}
    steps = _timm_steps(cfg)
    mine = describe(steps)
    assert isinstance(mine, PilSteps)
    assert PilSteps.from_dict(json.loads(json.dumps(mine.to_dict()))) == mine
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = img
        for s in steps:
            ref = s(ref)
        np.testing.assert_array_equal(mine(img), np.asarray(ref), err_msg=f"{w}x{h}")


def test_describe_refuses_other_transforms():
    from torchvision import transforms as T

    assert describe([T.Resize(10), T.RandomCrop(8)]) is None
    assert describe([T.CenterCrop(8)]) is None


# ----------------------------------------------------------------------------- decoding


def test_decoding_pool_keeps_input_order_and_reports_bad_images(tmp_path):
    from tlearn.data.decode import decoded_batches

    paths = [draw(tmp_path / f"{i}.jpg", (10 * i, 80, 120), seed=i) for i in range(7)]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths.insert(3, tmp_path / "broken.jpg")
    steps = PilSteps(resize=(40,), interpolation="bicubic", crop=(32, 32))
    runs = []
    for workers in (0, 2):
        got = list(
            decoded_batches(
                [str(p) for p in paths],
                steps,
                batch_size=3,
                workers=workers,
                min_size=40,
                keyed=True,
            )
        )
        runs.append(got)
        idx = [i for b in got for i in b[0]]
        bad = [i for b in got for i, _ in b[2]]
        assert idx == [0, 1, 2, 4, 5, 6, 7] and bad == [3]
        assert all(b[1].shape[1:] == (32, 32, 3) and b[1].dtype == np.uint8 for b in got)
        assert all(len(k) == 32 for b in got for k in b[3])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a[1], b[1])
        assert a[3] == b[3]


# ----------------------------------------------------------------------------- warm CLI


def test_warm_extract_needs_no_torch_and_writes_the_same_csv(tmp_path, cache):
    data = tmp_path / "data"
    make_dataset(data, n=4)
    cold = tmp_path / "cold.csv"
    rc, _, err, heavy = tlearn(["extract", data, "-o", cold, "-q", *TINY], cache)
    assert rc == 0, err
    assert "torch" in heavy  # the first run loads the backbone and exports it
    for name in ("features", "onnx", "resolved"):
        assert (cache / name).is_dir()
    # features cached: nothing computed; then only the graph cached: computed again
    for drop_features in (False, True):
        if drop_features:
            import shutil

            shutil.rmtree(cache / "features")
        warm = tmp_path / f"warm{int(drop_features)}.csv"
        rc, _, err, heavy = tlearn(["extract", data, "-o", warm, "-q", *TINY], cache)
        assert rc == 0, err
        assert heavy == [], f"a warm run imported {heavy}"
        assert warm.read_bytes() == cold.read_bytes()
        side = json.loads(Path(f"{warm}.json").read_text())
        assert side.pop("skipped_csv") == f"{warm.name}.skipped.csv"  # named after the output
        assert side == {
            k: v
            for k, v in json.loads(Path(f"{cold}.json").read_text()).items()
            if k != "skipped_csv"
        }


def test_warm_fit_predict_evaluate_match_cold_ones(tmp_path, cache):
    data = tmp_path / "data"
    make_dataset(data, n=4)
    args = ["-q", *TINY]
    outs = {}
    for kind in ("cold", "warm"):
        env = {"TLEARN_NO_WARM": "1"} if kind == "cold" else {}
        m = tmp_path / f"m-{kind}"
        rc, _, err, heavy = tlearn(["fit", data, "-o", m, "--C", "0.01", *args], cache, **env)
        assert rc == 0, err
        rc, pred, err, heavy_p = tlearn(["predict", m, data, "--format", "csv"], cache, **env)
        assert rc == 0, err
        rc, ev, err, heavy_e = tlearn(["evaluate", m, data, "--json"], cache, **env)
        assert rc == 0, err
        outs[kind] = (m, pred, json.loads(ev))
        if kind == "warm":
            assert heavy == heavy_p == heavy_e == [], (heavy, heavy_p, heavy_e)
        else:
            assert "torch" in heavy_p  # TLEARN_NO_WARM forces the ordinary path
    (mc, pc, ec), (mw, pw, ew) = outs["cold"], outs["warm"]
    assert pw == pc
    ec.pop("model"), ew.pop("model")
    assert ew == ec
    assert (mw / "head.safetensors").read_bytes() == (mc / "head.safetensors").read_bytes()
    cfg_c, cfg_w = (json.loads((m / "config.json").read_text()) for m in (mc, mw))
    for cfg in (cfg_c, cfg_w):
        cfg.pop("created", None)
    assert cfg_w == cfg_c


def test_changed_weights_file_is_never_served_warm(tmp_path, cache):
    """The request key hashes the weights file: new weights at the same path and size
    mean a cold run with the new weights, not the old graph."""
    import timm
    import torch
    from safetensors.torch import save_file

    data = tmp_path / "data"
    make_dataset(data, n=2)
    wfile = tmp_path / "w.safetensors"

    def write_weights(seed):
        torch.manual_seed(seed)
        m = timm.create_model("test_efficientnet", pretrained=False)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(wfile))

    args = ["--model", "test_efficientnet", "--weights", wfile, "-q"]
    write_weights(1)
    tlearn(["extract", data, "-o", tmp_path / "a.csv", *args], cache)
    rc, _, err, heavy = tlearn(["extract", data, "-o", tmp_path / "b.csv", *args], cache)
    assert rc == 0 and heavy == [], err
    size = wfile.stat().st_size
    write_weights(2)
    assert wfile.stat().st_size == size
    rc, _, err, heavy = tlearn(["extract", data, "-o", tmp_path / "c.csv", *args], cache)
    assert rc == 0, err
    assert "torch" in heavy
    a, c = (
        np.loadtxt(tmp_path / n, delimiter=",", skiprows=1, usecols=range(2, 6))
        for n in ("a.csv", "c.csv")
    )
    assert not np.allclose(a, c)
    # and a model fitted on the first weights refuses to predict with the second
    m = tmp_path / "m"
    write_weights(1)
    assert tlearn(["fit", data, "-o", m, *args], cache)[0] == 0
    write_weights(2)
    rc, _, err, _ = tlearn(["predict", m, data], cache)
    assert rc != 0 and "differ from those the model was fitted with" in err


@pytest.mark.parametrize(
    "device, expected", [("cpu", True), ("cuda", False), ("cuda:1", False), ("mps", False)]
)
def test_only_certain_cpu_runs_are_warm(device, expected):
    from tlearn.core.system import cpu_only

    assert cpu_only(device) is expected


def test_warm_run_respects_backend_and_no_cache(tmp_path, cache, runner):
    data = tmp_path / "data"
    make_dataset(data, n=2)
    base = ["extract", data, "-q", *TINY]
    assert tlearn([*base, "-o", tmp_path / "a.csv"], cache)[0] == 0
    rc, _, err, heavy = tlearn([*base, "-o", tmp_path / "b.csv", "--backend", "torch"], cache)
    assert rc == 0, err
    assert "torch" in heavy
    # --no-cache is about the feature cache: start-up stays warm, no features are stored
    features = sorted((cache / "features").rglob("*.npy"))
    rc, _, err, heavy = tlearn([*base, "-o", tmp_path / "c.csv", "--no-cache"], cache)
    assert rc == 0, err
    assert heavy == []
    assert sorted((cache / "features").rglob("*.npy")) == features
    assert (tmp_path / "c.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


def test_a_frozen_neural_head_trains_on_cached_features_and_predicts_warm(tmp_path, cache):
    """fit --head linear|mlp (frozen backbone) gets its features from the engine: a second
    fit computes none, and predict/evaluate start warm like an SVM model's."""
    data = tmp_path / "data"
    make_dataset(data, n=4)
    assert tlearn(["fit", data, "-o", tmp_path / "svm", "-q", *TINY], cache)[0] == 0
    for head, lr in (("linear", "1e-3"), ("linear", "3e-3"), ("mlp", "1e-3")):
        m = tmp_path / f"{head}-{lr}"
        args = ["fit", data, "-o", m, "--head", head, "--lr", lr, "--epochs", "2", "--json"]
        rc, out, err, heavy = tlearn([*args, *TINY], cache)
        assert rc == 0, err
        res = json.loads(out)
        assert res["features"]["computed"] == 0 or lr == "1e-3" and head == "linear"
        assert "timm" not in heavy  # the backbone was never loaded
        rc, pred, err, heavy = tlearn(["predict", m, data, "-f", "jsonl"], cache)
        assert rc == 0, err
        assert heavy == [], heavy
        rc, ev, err, heavy = tlearn(["evaluate", m, data, "--json"], cache)
        assert rc == 0 and heavy == [], (err, heavy)
        assert json.loads(ev)["n_images"] == 12
        rows = [json.loads(line) for line in pred.splitlines()]
        assert len(rows) == 12 and all(0 < r["score"] <= 1 for r in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="patches a forked worker")
def test_a_dying_decoding_worker_fails_the_run_instead_of_hanging(tmp_path, monkeypatch):
    import tlearn.data.decode as dec
    from tlearn.core.errors import DataError
    from tlearn.data.decode import decode_one, decoded_batches

    paths = [str(draw(tmp_path / f"{i}.png", (9, 9, 9), seed=i)) for i in range(6)]
    real = decode_one

    def crash_on_4(path, *a):
        if path.endswith("4.png"):
            os._exit(3)  # what a segfault in a decoder or the OOM killer looks like
        return real(path, *a)

    monkeypatch.setattr(dec, "decode_one", crash_on_4)  # inherited by the forked workers
    steps = PilSteps(resize=(8,), interpolation="bilinear", crop=(8, 8))
    batches = decoded_batches(paths, steps, batch_size=2, workers=1, min_size=None, keyed=False)
    with pytest.raises(DataError, match=r"died while reading .*4\.png.*--workers 0"):
        list(batches)


def test_messy_folder_same_rows_and_skips_with_worker_processes_warm_and_cold(tmp_path, cache):
    """Every awkward and broken kind of file through the decoding pool (workers), warm and
    cold, gives exactly the rows and skipped.csv of in-process decoding."""
    import imagegen

    root = tmp_path / "messy"
    imagegen.make_messy_folder(root)
    # enough images for several batches of 4 with workers
    outs = {}
    for name, extra, env in (
        ("cold-inproc", ["--workers", "0"], {"TLEARN_NO_WARM": "1"}),
        ("warm-workers", ["--workers", "1"], {}),
        ("warm-2workers", ["--workers", "2"], {}),
        ("cold-workers", ["--workers", "1", "--no-cache"], {}),
    ):
        (tmp_path / name).mkdir()
        out = tmp_path / name / "f.csv"
        args = ["extract", root, "-o", out, "--batch-size", "4", "-q", *TINY, *extra]
        rc, _, err, heavy = tlearn(args, cache, **env)
        assert rc == 0, err
        if name.startswith("warm"):
            assert heavy == [], name
        outs[name] = (out.read_bytes(), Path(f"{out}.skipped.csv").read_bytes())
    first = outs.pop("cold-inproc")
    assert first[1].count(b"\n") > 3  # several files were skipped, each named
    for name, got in outs.items():
        assert got == first, name


def test_a_damaged_cached_graph_is_exported_again(tmp_path, cache):
    data = tmp_path / "data"
    make_dataset(data, n=2)
    base = ["extract", data, "-q", *TINY]
    assert tlearn([*base, "-o", tmp_path / "a.csv"], cache)[0] == 0
    (graph,) = (cache / "onnx").glob("*.onnx")
    graph.write_bytes(b"not an onnx graph")
    import shutil

    shutil.rmtree(cache / "features")  # so the graph is needed
    rc, _, err, _ = tlearn([*base, "-o", tmp_path / "b.csv"], cache)
    assert rc == 0, err
    assert "was damaged" in err and "exported again" in err  # caught by its checksum
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
    assert graph.stat().st_size > 1000  # a real graph again
    rc, _, err, heavy = tlearn([*base, "-o", tmp_path / "c.csv"], cache)
    assert rc == 0 and heavy == [], err


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, "cores"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "half"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TLEARN_NUM_THREADS": "3"}, 3),
    ],
)
def test_onnx_runs_per_rank_do_not_oversubscribe_the_machine(monkeypatch, environ, expected):
    from tlearn.core.system import cpu_cores
    from tlearn.runtime.ort import cpu_streams

    for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "TLEARN_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    want = {"cores": cpu_cores(), "half": max(1, cpu_cores() // 2)}.get(expected, expected)
    assert cpu_streams() == want


@pytest.mark.parametrize(
    "nodes, visible, device, expected",
    [
        ([], None, "auto", True),  # no GPU device nodes at all
        (["/dev/nvidia0"], None, "auto", False),  # auto may pick the GPU: torch decides
        (["/dev/nvidia0"], "", "auto", True),  # hidden: torch sees no CUDA either
        (["/dev/nvidia0"], "-1", "auto", True),
        (["/dev/nvidia0"], "0", "auto", False),
        (["/dev/nvidia0", "/dev/kfd"], "", "auto", False),  # AMD: CUDA_VISIBLE_DEVICES is not it
        (["/dev/nvidia0"], None, "cpu", True),
        ([], None, "cuda", False),
    ],
)
def test_cpu_only_is_decided_without_torch(monkeypatch, nodes, visible, device, expected):
    import glob

    from tlearn.core.system import cpu_only

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(
        glob, "glob", lambda pattern: [n for n in nodes if n.startswith(pattern.rstrip("*"))]
    )
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert cpu_only(device) is expected
