"""Inference backends: ONNX Runtime and torch compute the same features; export is cached,
checked, and falls back to torch with a note when it cannot be done."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

import tlearn.runtime.export as rt
from tests.conftest import TINY
from tlearn.backbone.cut import feature_dim, feature_network
from tlearn.backbone.weights import load_backbone
from tlearn.cli.app import app
from tlearn.core.errors import UsageError
from tlearn.core.spec import DEFAULT_MODEL, bundled_weights_file
from tlearn.features.stream import extract_array
from tlearn.features.table import read_features_csv
from tlearn.runtime.device import choose_backend, precision
from tlearn.runtime.export import cached_onnx, export_onnx, open_runtime
from tlearn.runtime.ort import OnnxRuntime, ort_providers
from tlearn.runtime.torch_runtime import PixelInput, TorchRuntime
from tlearn.runtime.transforms import pixel_path


def _tiny(layers=None, pool="avg"):
    backbone = load_backbone("test_efficientnet", "none")
    net, spec = feature_network(backbone, layers, pool)
    return net, spec, backbone.data_config


def _paths(folder):
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


def _features(backend, net, spec, cfg, paths, cache_root, pixels=None):
    runtime = open_runtime(
        net,
        spec,
        cfg,
        backend=backend,
        device=torch.device("cpu"),
        cache_root=cache_root,
        pixels=pixels,
    )
    assert runtime.name == backend
    assert (runtime.transform is None) == (pixels is None)
    return extract_array(runtime, paths, cfg, workers=0).X


def assert_close(a, b, tol=1e-4):
    """Within `tol`, absolute for features of order 1, relative for larger or smaller ones."""
    scale = max(float(np.abs(b).max()), 1e-30)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * max(scale, 1.0 if scale > 1e-2 else scale)


@pytest.mark.parametrize(
    "layers, pool", [(None, "avg"), ("blocks.1", "avg"), ("blocks.0,final", "catavgmax")]
)
def test_onnx_and_torch_features_agree(tmp_path, image_folder, layers, pool):
    net, spec, cfg = _tiny(layers, pool)
    paths = _paths(image_folder)[::3]  # JPEGs and PNGs of every class
    pixels = pixel_path(cfg)
    cpu = TorchRuntime(net, torch.device("cpu"))
    ref = extract_array(cpu, paths, cfg, workers=0).X  # plain torch, float32 transform
    assert ref.shape == (len(paths), feature_dim(net, cfg["input_size"]))
    assert np.abs(ref).max() > 0
    for backend in ("onnx", "torch"):
        for px in (None, pixels):
            assert_close(_features(backend, net, spec, cfg, paths, tmp_path, px), ref)


def test_onnx_matches_torch_with_real_weights(tmp_path, image_folder):
    """The default backbone with its bundled ImageNet weights: features of order 1-10."""
    if bundled_weights_file(DEFAULT_MODEL) is None:
        pytest.skip("bundled weights for the default backbone are not installed")
    backbone = load_backbone(DEFAULT_MODEL, "auto")
    net, spec = feature_network(backbone, None, "avg")
    paths = _paths(image_folder)[:6]
    cfg = backbone.data_config
    b = _features("torch", net, spec, cfg, paths, tmp_path)
    a = _features("onnx", net, spec, cfg, paths, tmp_path, pixel_path(cfg))
    assert np.abs(b).max() > 1.0
    assert np.abs(a - b).max() <= 1e-4


def test_exported_model_is_cached_and_keyed_by_cut(tmp_path, monkeypatch):
    calls = []
    real = export_onnx
    monkeypatch.setattr(rt, "export_onnx", lambda *a: (calls.append(a), real(*a)))
    net, spec, cfg = _tiny()
    p1 = cached_onnx(net, spec, cfg, tmp_path)
    p2 = cached_onnx(net, spec, cfg, tmp_path)
    assert p1 == p2 and p1.is_file() and len(calls) == 1
    net2, spec2, _ = _tiny("blocks.1")
    p3 = cached_onnx(net2, spec2, cfg, tmp_path)
    assert p3 != p1 and len(calls) == 2
    assert not list((tmp_path / "onnx").glob("*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize("streams", [1, 2])
def test_dynamic_batch_axis(tmp_path, streams):
    net, spec, cfg = _tiny()
    path = cached_onnx(net, spec, cfg, tmp_path)
    runtime = OnnxRuntime(path, torch.device("cpu"), streams=streams)
    for n in (1, 5):
        x = torch.randn(n, *cfg["input_size"])
        with torch.inference_mode():
            ref = net(x).numpy()
        assert_close(runtime(x), ref)


def test_pixel_input_is_the_same_arithmetic_as_the_eval_transform(image_folder):
    """uint8 pixels normalised by the runtime give bit-identical input to the network."""
    from tlearn.data.image import load_image
    from tlearn.runtime.transforms import eval_transform, split_eval_transform

    _, _, cfg = _tiny()
    pixel_tf, mean, std = split_eval_transform(cfg)
    seen = []
    capture = torch.nn.Module()
    capture.forward = lambda x: seen.append(x) or x.flatten(1)[:, :4]
    wrapper = PixelInput(capture, mean, std)
    for p in _paths(image_folder)[:4]:
        img = load_image(p)
        pixels = pixel_tf(img)  # uint8 HWC: numpy from tlearn.pixels.PilSteps
        wrapper(torch.as_tensor(pixels)[None])
        assert torch.equal(seen[-1], eval_transform(cfg)(img)[None])


def test_failed_export_falls_back_to_torch_with_a_note(tmp_path, monkeypatch):
    def broken(*a):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate\nmore detail")

    monkeypatch.setattr(rt, "export_onnx", broken)
    net, spec, cfg = _tiny()
    notes: list[str] = []
    runtime = open_runtime(
        net, spec, cfg, backend="auto", device=torch.device("cpu"), cache_root=tmp_path, notes=notes
    )
    assert runtime.name == "torch"
    assert len(notes) == 1 and "frobnicate" in notes[0] and "using torch" in notes[0]
    assert "\n" not in notes[0]


def test_fallback_note_reaches_the_cli(tmp_path, image_folder, runner, monkeypatch):
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "cache"))  # no graph exported yet
    monkeypatch.setattr(rt, "export_onnx", lambda *a: (_ for _ in ()).throw(ValueError("nope")))
    out = tmp_path / "f.csv"
    res = runner.invoke(app, ["extract", str(image_folder), "-o", str(out), "--no-cache", *TINY])
    assert res.exit_code == 0, res.output
    assert "ONNX export" in res.output and "using torch" in res.output
    assert len(read_features_csv(out).paths) == 18


def test_no_cache_export_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    net, spec, cfg = _tiny()
    runtime = open_runtime(
        net, spec, cfg, backend="onnx", device=torch.device("cpu"), cache_root=None
    )
    assert runtime.name == "onnx"
    assert list(tmp_path.iterdir()) == []


def test_choose_backend():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) == "onnx"
    assert choose_backend("torch", cpu) == "torch"
    assert choose_backend("onnx", cpu) == "onnx"
    assert choose_backend("auto", torch.device("cuda")) == "torch"
    assert precision("torch", torch.device("cuda")) == "amp-fp16"
    assert precision("onnx", cpu) == precision("torch", cpu) == "fp32"
    with pytest.raises(UsageError, match="allowed: auto, torch, onnx"):
        choose_backend("tensorrt", cpu)
    if "CUDAExecutionProvider" not in ort_providers():
        with pytest.raises(UsageError, match="--backend onnx"):
            choose_backend("onnx", torch.device("cuda"))


def test_cli_rejects_unknown_backend(tmp_path, image_folder, runner):
    res = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "f.csv"), *TINY,
                              "--backend", "tensorrt"])  # fmt: skip
    assert res.exit_code == 2
    assert "tensorrt" in res.output


def test_torch_runtime_channels_last_matches_plain_forward():
    net, spec, cfg = _tiny("blocks.1")
    x = torch.randn(3, *cfg["input_size"])
    with torch.inference_mode():
        ref = net(x).numpy()
    got = TorchRuntime(net, torch.device("cpu"))(x)
    assert_close(got, ref, tol=1e-5)
