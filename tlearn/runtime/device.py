"""Which device and which inference backend a run uses: --device resolved to a torch
device, --backend auto|torch|onnx resolved for that device, and the precision that names
the numbers in the feature cache."""

from __future__ import annotations

from tlearn.core.errors import DataError, UsageError
from tlearn.runtime.ort import ort_installed, ort_providers

BACKENDS = ("auto", "torch", "onnx")


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
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise DataError(f"unknown --device '{device}'; allowed: auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps: MPS is not available here; use --device cpu")
    return torch.device(device)
