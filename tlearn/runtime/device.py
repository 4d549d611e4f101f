"""Which device and which inference backend a run uses: --device resolved to a torch
device, --backend auto|torch|onnx resolved for that device, and the precision that names
the numbers in the feature cache."""

from __future__ import annotations

from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import check_device
from tlearn.data.pixels import PilSteps
from tlearn.runtime.ort import ort_installed, ort_providers

BACKENDS = ("auto", "torch", "onnx")
DECODES = ("auto", "cpu", "gpu")
GPU_INTERPOLATIONS = ("bilinear", "bicubic")  # torch's antialiased resize has Pillow's kernels


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend '{backend}'; allowed: {', '.join(BACKENDS)}")
    return backend


def choose_backend(backend: str, device) -> str:
    """The backend that will actually run on `device` (a torch.device, or anything with a
    `.type`): onnx only on CPU (or CUDA with onnxruntime-gpu when asked for explicitly),
    torch otherwise."""
    validate_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "onnx":
        if device.type == "cpu":
            return "onnx"
        if device.type == "cuda" and "CUDAExecutionProvider" in ort_providers():
            return "onnx"
        raise UsageError(
            f"--backend onnx runs on the CPU here (onnxruntime has no {device.type} provider); "
            "use --device cpu, or --backend torch/auto for the GPU"
        )
    return "onnx" if device.type == "cpu" and ort_installed() else "torch"


def precision(backend: str, device) -> str:
    """What the numbers are computed in; part of the feature cache key. torch fp32 and
    ONNX Runtime fp32 agree within 1e-4 and share cache entries; fp16 autocast does not."""
    return "amp-fp16" if backend == "torch" and device.type == "cuda" else "fp32"


def resolve_device(device: str = "auto"):
    """The torch.device for --device."""
    # only runs that open torch need a torch.device
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps: MPS is not available here; use --device cpu")
    return torch.device(device)


def validate_decode(decode: str) -> str:
    if decode not in DECODES:
        raise UsageError(f"unknown --decode '{decode}'; allowed: {', '.join(DECODES)}")
    return decode


def choose_decode(decode: str, device_type: str, backend: str, steps, gpu_decoder: bool) -> str:
    """Where JPEGs are decoded: "cpu" (worker processes, Pillow) or "gpu" (nvJPEG through
    torchvision, resized and cropped on the device; runtime.gpu_decode).

    GPU decoding needs the torch backend on a CUDA device, preprocessing that is a plain
    resize + centre crop (`steps` a PilSteps) and a torchvision that decodes on CUDA
    (`gpu_decoder`). `auto` takes it whenever it can be had: the expectation (issue 15)
    is that nvJPEG on a data-centre GPU decodes faster than the machine's cores and leaves
    them free; that choice is not yet measured for this implementation, so --decode cpu
    stays one option away (docs/benchmarks.md)."""
    validate_decode(decode)
    if decode == "cpu":
        return "cpu"
    problem = None
    if device_type != "cuda":
        problem = f"needs a CUDA device (this run is on {device_type}); use --decode cpu or auto"
    elif backend != "torch":
        problem = f"needs the torch backend (this run uses {backend}); use --backend torch"
    elif not isinstance(steps, PilSteps) or steps.interpolation not in GPU_INTERPOLATIONS:
        problem = (
            "needs preprocessing that is a bilinear or bicubic resize + centre crop, and this "
            "model's is not; use --decode cpu"
        )
    elif not gpu_decoder:
        problem = "needs a torchvision that decodes JPEGs on CUDA (nvJPEG); use --decode cpu"
    if problem is None:
        return "gpu"
    if decode == "gpu":
        raise UsageError(f"--decode gpu {problem}")
    return "cpu"
