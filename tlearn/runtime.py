"""Inference backends for the cut network: ONNX Runtime on CPU, torch elsewhere.

Measured on a 2-core AVX2/AVX-512 machine (tf_efficientnet_lite0, 224 px, batch 32,
forward only): torch eager 30 img/s, torch channels_last 55, ONNX Runtime 189, with
outputs within 1e-5 of torch (docs/benchmarks.md, benchmarks/backends.py). So `auto`
means: ONNX Runtime on CPU (the cut network exported once and cached), torch with
channels_last and fp16 autocast on CUDA, torch on MPS. Training stays in torch; this
module only runs inference.

A runtime is a callable: a batch in, (B, D) float32 numpy features out. The batch is
either float32 NCHW, already normalised (what preprocess.eval_transform gives), or, when
the runtime has a `transform` (the pixel path), uint8 NHWC pixels that the runtime
normalises itself with the same float32 arithmetic (preprocess.split_eval_transform):
decoding workers then do less work and move 4x less data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tlearn.core.errors import UsageError
from tlearn.core.system import dist_version
from tlearn.core.version import __version__
from tlearn.engine import Engine  # noqa: F401  (re-exported)
from tlearn.onnxrt import (
    ONNX_OPSET,
    TMP_PREFIX,
    LazyRuntime,
    OnnxRuntime,
    _ort_installed,
    _ort_providers,
    onnx_key,
    onnx_path,
)

BACKENDS = ("auto", "torch", "onnx")
# Exported graphs must reproduce torch this closely on a random batch, else torch is used.
EXPORT_ATOL = 1e-3


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend '{backend}'; allowed: {', '.join(BACKENDS)}")
    return backend


def choose_backend(backend: str, device: torch.device) -> str:
    """The backend that will actually run: onnx only on CPU (or CUDA with onnxruntime-gpu
    when asked for explicitly), torch otherwise."""
    validate_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "onnx":
        if device.type == "cpu":
            return "onnx"
        if device.type == "cuda" and "CUDAExecutionProvider" in _ort_providers():
            return "onnx"
        raise UsageError(
            f"--backend onnx runs on the CPU here (onnxruntime has no {device.type} provider); "
            "use --device cpu, or --backend torch/auto for the GPU"
        )
    return "onnx" if device.type == "cpu" and _ort_installed() else "torch"


def precision(backend: str, device: torch.device) -> str:
    """What the numbers are computed in; part of the feature cache key. torch fp32 and
    ONNX Runtime fp32 agree within 1e-4 and share cache entries; fp16 autocast does not."""
    return "amp-fp16" if backend == "torch" and device.type == "cuda" else "fp32"


# ----------------------------------------------------------------------------- runtimes


class PixelInput(torch.nn.Module):
    """uint8 NHWC pixels -> ToTensor + Normalize arithmetic -> the feature network."""

    def __init__(self, net: torch.nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # permute gives a channels_last view; the float math is ToTensor's and Normalize's.
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        return self.net(x.sub(self.mean).div(self.std))


def pixel_path(data_config: dict):
    """(PixelTransform, mean, std) from preprocess, or None when the transform does not
    split into PIL steps + ToTensor + Normalize."""
    from tlearn.preprocess import split_eval_transform

    return split_eval_transform(data_config)


def example_input(data_config: dict, n: int, pixels: bool, random: bool = False):
    c, h, w = data_config["input_size"]
    g = torch.Generator().manual_seed(0)
    if pixels:
        if random:
            return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        return torch.zeros(n, h, w, c, dtype=torch.uint8)
    return torch.randn(n, c, h, w, generator=g) if random else torch.zeros(n, c, h, w)


class TorchRuntime:
    """torch inference: channels_last (faster for convolutions on CPU and CUDA) and fp16
    autocast on CUDA. With `pixels` (transform, mean, std) it takes uint8 NHWC batches and
    normalises them on the device (on a GPU: 4x less to copy over PCIe)."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: torch.device, pixels=None):
        self.device = device
        self.transform = None
        if pixels is not None:
            self.transform = pixels[0]
            net = PixelInput(net, pixels[1], pixels[2])
        self.channels_last = device.type in ("cpu", "cuda")
        self.amp = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        net = net.to(device).eval()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if isinstance(x, np.ndarray):  # uint8 pixels from tlearn.decode
            x = torch.from_numpy(x)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4 and x.dtype != torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.amp),
        ):
            y = self.net(x)
        return y.float().cpu().numpy()


# ----------------------------------------------------------------------------- ONNX export


def export_onnx(net: torch.nn.Module, data_config: dict, path: str | Path, pixels=None) -> None:
    """Export the feature network with a dynamic batch axis (legacy TorchScript exporter:
    it needs no onnxscript) and check ONNX Runtime reproduces torch on a random batch.
    With `pixels` (transform, mean, std) the graph takes uint8 NHWC pixels."""
    import onnxruntime  # noqa: F401  (fail early, before spending time on the export)

    net = net.cpu().eval()
    if pixels is not None:
        net = PixelInput(net, pixels[1], pixels[2]).eval()
    example = example_input(data_config, 1, pixels is not None, random=True)
    # Tracing runs the real forward pass once: keep its output as the reference instead of
    # paying for another forward (a first forward in torch costs seconds on a small CPU).
    outputs: list[torch.Tensor] = []
    hook = net.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    hook.remove()
    if outputs:
        ref = outputs[0].float().numpy()
    else:  # an exporter that did not call forward: compute the reference
        with torch.inference_mode():
            ref = net(example).float().numpy()
    # Check at another batch size than the export's, so a batch size baked into the graph
    # (e.g. by a reshape) is caught here.
    check = OnnxRuntime(path, torch.device("cpu"), streams=1, threads=1)
    got = check(torch.cat([example, example]))
    ref = np.concatenate([ref, ref])
    if got.shape != ref.shape:
        raise RuntimeError(f"exported graph gives shape {got.shape}, torch {ref.shape}")
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if not diff <= EXPORT_ATOL * scale:
        raise RuntimeError(f"exported graph differs from torch by {diff:.2g}")


def cached_onnx(
    net: torch.nn.Module, spec, data_config: dict, cache_root: Path | None, pixels=None
) -> Path:
    """The exported model for this cut, exporting it once into `cache_root`/onnx (atomic:
    export to a temporary name, then rename). Without a cache root, a temporary file."""
    if cache_root is None:
        tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        path = tmpdir / "model.onnx"
        try:
            export_onnx(net, data_config, path, pixels)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return path
    key = onnx_key(spec, data_config, pixels is not None)
    path = onnx_path(cache_root, spec, data_config, pixels is not None)
    folder = path.parent
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unusable cache folder costs the export, never the run
        return cached_onnx(net, spec, data_config, None, pixels)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        export_onnx(net, data_config, tmp, pixels)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    from tlearn.core.atomic import write_json

    with contextlib.suppress(OSError):
        write_json(
            path.with_suffix(".json"),
            {
                "key": key,
                "cut": spec.to_dict(),
                "input_size": list(data_config["input_size"]),
                "input": "uint8-nhwc" if pixels is not None else "float32-nchw",
                "opset": ONNX_OPSET,
                "torch": dist_version("torch"),
                "tlearn": __version__,
            },
        )
    return path


# ----------------------------------------------------------------------------- opening


def open_runtime(
    net: torch.nn.Module,
    spec,
    data_config: dict,
    *,
    backend: str = "auto",
    device: torch.device,
    cache_root: Path | None,
    notes: list[str] | None = None,
    pixels=None,
) -> TorchRuntime | OnnxRuntime:
    """Open the chosen backend now. A failed ONNX export with `auto` falls back to torch
    with a one-line note; with an explicit `--backend onnx` too, since the features are
    the same (the note says why). `pixels`: see TorchRuntime."""
    chosen = choose_backend(backend, device)
    if chosen == "onnx":
        try:
            path = cached_onnx(net, spec, data_config, cache_root, pixels)
            try:
                return OnnxRuntime(path, device, transform=pixels[0] if pixels else None)
            finally:
                if path.parent.name.startswith(TMP_PREFIX):  # not cached: remove
                    shutil.rmtree(path.parent, ignore_errors=True)
        except Exception as e:  # any exporter/ORT failure: torch computes the same features
            if notes is not None:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                notes.append(
                    f"ONNX export of {spec.model} at {','.join(spec.layers)} failed "
                    f"({type(e).__name__}: {msg[:120]}); using torch"
                )
    return TorchRuntime(net, device, pixels)


def feature_engine(
    net: torch.nn.Module,
    spec,
    data_config: dict,
    run,
) -> Engine:
    """How features are computed for `run` (core.options.RunOptions): backend + feature
    cache."""
    backend, device, cache, draft = run.backend, run.device, run.cache, run.draft
    from tlearn.cache import cache_root
    from tlearn.features import resolve_device

    dev = resolve_device(device)
    chosen = choose_backend(backend, dev)
    root = cache_root() if cache else None
    notes: list[str] = []
    pixels = pixel_path(data_config)
    from tlearn.warm import remember_pixels

    remember_pixels(root, data_config, pixels)  # for runs without torch (tlearn.warm)

    def opener():
        return open_runtime(
            net,
            spec,
            data_config,
            backend=backend,
            device=dev,
            cache_root=root,
            notes=notes,
            pixels=pixels,
        )

    return Engine(
        net=net,
        spec=spec,
        data_config=data_config,
        runtime=LazyRuntime(opener, dev, pixels[0] if pixels else None),
        cache_root=root,
        draft=draft,
        precision=precision(chosen, dev),
        notes=notes,
    )
