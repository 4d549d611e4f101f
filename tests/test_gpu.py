"""CUDA: extraction, training and torchrun (NCCL) on a GPU.

Skipped unless a CUDA GPU is there AND TLEARN_TEST_GPU=1 (conftest.py hides GPUs from the
rest of the suite, which pins down CPU behaviour). On a GPU machine:

    TLEARN_TEST_GPU=1 python -m pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import TINY, draw
from tests.test_shard import REPO
from tlearn.cli.app import app
from tlearn.features.table import read_features_csv


def _cuda() -> bool:
    if os.environ.get("TLEARN_TEST_GPU") != "1":
        return False
    import torch

    return torch.cuda.is_available()


pytestmark = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU and TLEARN_TEST_GPU=1")


def test_cuda_features_match_cpu_features(image_folder, tmp_path, runner):
    """fp16 autocast on CUDA, fp32 ONNX Runtime on the CPU: same rows, close features."""
    out = {}
    for device in ("cuda", "cpu"):
        csv = tmp_path / f"{device}.csv"
        r = runner.invoke(
            app,
            ["extract", str(image_folder), "-o", str(csv), "--device", device, "--decode", "cpu"]
            + TINY,
        )
        assert r.exit_code == 0, r.output
        out[device] = read_features_csv(csv)
    gpu, cpu = out["cuda"], out["cpu"]
    assert gpu.paths == cpu.paths and gpu.X.shape == cpu.X.shape
    scale = np.abs(cpu.X).max()
    assert np.abs(gpu.X - cpu.X).max() <= 0.02 * scale
    cos = (gpu.X * cpu.X).sum(1) / (np.linalg.norm(gpu.X, axis=1) * np.linalg.norm(cpu.X, axis=1))
    assert cos.min() > 0.999


def test_neural_fit_on_cuda_then_predict_on_cpu(split_folder, tmp_path, runner):
    model = tmp_path / "m"
    args = ["fit", str(split_folder / "train"), "--val", str(split_folder / "val")]
    args += ["--head", "linear", "--freeze-to", "auto", "--epochs", "2", "--device", "cuda"]
    r = runner.invoke(app, [*args, "-o", str(model), "--json", *TINY])
    assert r.exit_code == 0, r.output
    history = json.loads((model / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    preds = tmp_path / "p.csv"
    r = runner.invoke(
        app, ["predict", str(model), str(split_folder / "val"), "-o", str(preds), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert len(preds.read_text().splitlines()) > 1


def _torchrun(n: int, args: list[str], cwd) -> subprocess.CompletedProcess:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(n), "-m", "tlearn", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_trains_over_nccl(split_folder, tmp_path):
    args = ["fit", str(split_folder / "train"), "--head", "linear", "--epochs", "2"]
    args += ["--freeze-to", "auto", "--batch-size", "4", "-o", "m", "-q", *TINY]
    r = _torchrun(1, args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "m" / "config.json").is_file()


def test_more_processes_than_gpus_is_one_clear_error(split_folder, tmp_path):
    import torch

    n = torch.cuda.device_count() + 1
    args = ["fit", str(split_folder / "train"), "--head", "linear", "--epochs", "1"]
    args += ["--batch-size", str(2 * n), "-o", "m", "-q", *TINY]
    r = _torchrun(n, args, tmp_path)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "one GPU per process" in line]
    assert lines and all(line.startswith("error:") for line in lines), r.stderr[-3000:]
    assert not (tmp_path / "m").exists()


def test_gpu_decoding_matches_cpu_decoding(tmp_path, runner):
    """--decode gpu (nvJPEG, resize and crop on the GPU) against --decode cpu, both on
    CUDA: the same rows and skipped images, features within cosine 0.999 (issue 15)."""
    from tests.test_gpu_decode import _exif
    from tlearn.data.image import load_image

    data = tmp_path / "data"
    for i in range(24):  # photo-like sizes, JPEG and PNG, one rotated, one broken
        draw(data / f"c{i % 2}" / f"{i}.jpg", (40 * (i % 6), 120, 200), seed=i, size=(320, 240))
    draw(data / "c0" / "p.png", (10, 200, 10), seed=99, fmt="PNG")
    load_image(data / "c0" / "0.jpg").save(data / "c1" / "rot.jpg", exif=_exif(6))
    (data / "c1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = {}
    for decode in ("cpu", "gpu"):
        table = tmp_path / f"{decode}.parquet"
        args = ["extract", str(data), "-o", str(table), "--device", "cuda", "--decode", decode]
        r = runner.invoke(app, [*args, "--json", *TINY])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["engine"]["decode"] == decode and res["skipped"] == 1
        out[decode] = read_features_csv(table)
        if decode == "gpu":
            assert {"gpu decode", "forward (device)", "device-to-host"} <= set(
                res["engine"]["stages"]
            )
    gpu, cpu = out["gpu"], out["cpu"]
    assert gpu.paths == cpu.paths
    cos = (gpu.X * cpu.X).sum(1) / (np.linalg.norm(gpu.X, axis=1) * np.linalg.norm(cpu.X, axis=1))
    assert cos.min() > 0.999, cos.min()


def test_batches_in_flight_and_padding_keep_the_features(image_folder):
    """The CUDA runtime with 3 batches in flight, the last one padded, gives each image
    the features it gets alone in a full batch."""
    import torch

    from tlearn.backbone.cut import feature_network
    from tlearn.backbone.weights import open_backbone
    from tlearn.runtime.torch_runtime import TorchRuntime
    from tlearn.runtime.transforms import pixel_path

    backbone = open_backbone("test_efficientnet", "none")
    net, _ = feature_network(backbone, None, "avg")
    px = pixel_path(backbone.data_config)
    runtime = TorchRuntime(net, torch.device("cuda"), px)
    rng = np.random.default_rng(0)
    c, h, w = backbone.data_config["input_size"]
    x = rng.integers(0, 256, (22, h, w, c), dtype=np.uint8)
    whole = runtime(x[:8])
    pending = [runtime.submit(x[i : i + 8]) for i in range(0, 22, 8)]  # 8, 8, 6 (padded)
    got = np.concatenate([p.result() for p in pending])
    assert runtime.pad_to == 8
    np.testing.assert_allclose(got[:8], whole, rtol=1e-3, atol=1e-3)
    alone = np.concatenate([runtime(x[i : i + 1]) for i in range(16, 22)])
    np.testing.assert_allclose(got[16:], alone, rtol=1e-2, atol=1e-2)
