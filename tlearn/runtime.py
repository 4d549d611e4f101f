"""Inference backends for the cut network: ONNX Runtime on CPU, torch elsewhere.

Measured on a 2-core AVX2/AVX-512 machine (tf_efficientnet_lite0, 224 px, batch 32,
forward only), ONNX Runtime runs the same network 2-4x faster than torch eager, with
outputs within 1e-5; see docs/benchmarks.md. So `auto` means: ONNX Runtime on CPU
(the cut network exported once and cached), torch with channels_last and fp16 autocast
on CUDA, torch on MPS. Training stays in torch; this module only runs inference.

A runtime is a callable: a float32 NCHW batch (torch tensor) in, (B, D) float32
numpy features out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import UsageError

BACKENDS = ("auto", "torch", "onnx")
ONNX_OPSET = 17
ONNX_FORMAT = 1  # bump when the exported graph's inputs/outputs change meaning
# Exported graphs must reproduce torch this closely on a random batch, else torch is used.
EXPORT_ATOL = 1e-3
_TMP_PREFIX = "tlearn-onnx-"


def cpu_cores() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
    return "onnx" if device.type == "cpu" and _ort_providers() else "torch"


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def precision(backend: str, device: torch.device) -> str:
    """What the numbers are computed in; part of the feature cache key. torch fp32 and
    ONNX Runtime fp32 agree within 1e-4 and share cache entries; fp16 autocast does not."""
    return "amp-fp16" if backend == "torch" and device.type == "cuda" else "fp32"


# ----------------------------------------------------------------------------- runtimes


class TorchRuntime:
    """torch inference: channels_last (faster for convolutions on CPU and CUDA) and fp16
    autocast on CUDA."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.device = device
        self.channels_last = device.type in ("cpu", "cuda")
        self.amp = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        net = net.to(device).eval()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.amp),
        ):
            y = self.net(x)
        return y.float().cpu().numpy()


class OnnxRuntime:
    """ONNX Runtime inference session on an exported cut network."""

    name = "onnx"

    def __init__(self, model_path: str | Path, device: torch.device, threads: int | None = None):
        import onnxruntime as ort

        self.device = device
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or cpu_cores()
        so.inter_op_num_threads = 1
        # Decoding runs in worker processes beside the session: spinning idle threads would
        # take their CPU time (measured: spinning off is as fast alone and faster with them).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return self.session.run(None, {self.input_name: arr})[0]


class LazyRuntime:
    """Opens the real runtime on the first batch, so a run served wholly from the feature
    cache never loads ONNX Runtime or exports anything."""

    def __init__(self, opener: Callable[[], TorchRuntime | OnnxRuntime], device: torch.device):
        self._opener = opener
        self._runtime: TorchRuntime | OnnxRuntime | None = None
        self.device = device
        self.images = 0

    @property
    def opened(self) -> bool:
        return self._runtime is not None

    @property
    def name(self) -> str | None:
        return self._runtime.name if self._runtime is not None else None

    def open(self) -> TorchRuntime | OnnxRuntime:
        if self._runtime is None:
            self._runtime = self._opener()
        return self._runtime

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        runtime = self.open()
        self.images += len(x)
        return runtime(x)


# ----------------------------------------------------------------------------- ONNX export


def onnx_key(spec, data_config: dict) -> str:
    """Everything that determines the exported graph, hashed."""
    cut = spec.to_dict()
    if cut.get("weights_sha256"):
        cut.pop("weights_source", None)  # same weights from another path: same graph
    doc = {
        "format": ONNX_FORMAT,
        "cut": cut,
        "input_size": list(data_config["input_size"]),
        "opset": ONNX_OPSET,
        "exporter": "torchscript",
        "torch": torch.__version__,
        "tlearn": __version__,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def export_onnx(net: torch.nn.Module, data_config: dict, path: str | Path) -> None:
    """Export the feature network with a dynamic batch axis (legacy TorchScript exporter:
    it needs no onnxscript) and check ONNX Runtime reproduces torch on a random batch."""
    import onnxruntime  # noqa: F401  (fail early, before spending time on the export)

    size = tuple(data_config["input_size"])
    net = net.cpu().eval()
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
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
    got = OnnxRuntime(path, torch.device("cpu"), threads=1)(torch.cat([example, example]))
    ref = np.concatenate([ref, ref])
    if got.shape != ref.shape:
        raise RuntimeError(f"exported graph gives shape {got.shape}, torch {ref.shape}")
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if not diff <= EXPORT_ATOL * scale:
        raise RuntimeError(f"exported graph differs from torch by {diff:.2g}")


def cached_onnx(net: torch.nn.Module, spec, data_config: dict, cache_root: Path | None) -> Path:
    """The exported model for this cut, exporting it once into `cache_root`/onnx (atomic:
    export to a temporary name, then rename). Without a cache root, a temporary file."""
    if cache_root is None:
        tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        path = tmpdir / "model.onnx"
        try:
            export_onnx(net, data_config, path)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return path
    key = onnx_key(spec, data_config)
    folder = Path(cache_root) / "onnx"
    path = folder / f"{spec.model}-{key[:20]}.onnx"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unusable cache folder costs the export, never the run
        return cached_onnx(net, spec, data_config, None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        export_onnx(net, data_config, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    from .fsutil import write_json

    with contextlib.suppress(OSError):
        write_json(
            path.with_suffix(".json"),
            {
                "key": key,
                "cut": spec.to_dict(),
                "input_size": list(data_config["input_size"]),
                "opset": ONNX_OPSET,
                "torch": torch.__version__,
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
) -> TorchRuntime | OnnxRuntime:
    """Open the chosen backend now. A failed ONNX export with `auto` falls back to torch
    with a one-line note; with an explicit `--backend onnx` too, since the features are
    the same (the note says why)."""
    chosen = choose_backend(backend, device)
    if chosen == "onnx":
        try:
            path = cached_onnx(net, spec, data_config, cache_root)
            try:
                return OnnxRuntime(path, device)
            finally:
                if path.parent.name.startswith(_TMP_PREFIX):  # not cached: remove
                    shutil.rmtree(path.parent, ignore_errors=True)
        except Exception as e:  # any exporter/ORT failure: torch computes the same features
            if notes is not None:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                notes.append(
                    f"ONNX export of {spec.model} at {','.join(spec.layers)} failed "
                    f"({type(e).__name__}: {msg[:120]}); using torch"
                )
    return TorchRuntime(net, device)


@dataclass
class Engine:
    """How features get computed for one cut: a lazily opened runtime and, unless disabled,
    the feature cache. `kwargs()` are the extra arguments for features.iter_features."""

    net: torch.nn.Module
    spec: object
    data_config: dict
    runtime: LazyRuntime
    cache_root: Path | None
    draft: bool
    precision: str
    notes: list[str]
    stores: list = field(default_factory=list)

    def kwargs(self) -> dict:
        store = None
        if self.cache_root is not None:
            from .cache import FeatureStore

            store = FeatureStore.open(
                self.cache_root,
                self.spec,
                self.data_config,
                draft=self.draft,
                precision=self.precision,
            )
            store.notes = self.notes
            self.stores.append(store)
        return {"runtime": self.runtime, "cache": store, "draft": self.draft}

    def feature_dim(self) -> int:
        """Length of one feature vector: from the cache when it has this cut, else one
        zero image through the runtime (which a cold run opens anyway)."""
        if self.cache_root is not None and not self.runtime.opened:
            from .cache import FeatureStore

            store = FeatureStore.open(
                self.cache_root,
                self.spec,
                self.data_config,
                draft=self.draft,
                precision=self.precision,
            )
            if store.dim is not None:
                return store.dim
        x = torch.zeros(1, *self.data_config["input_size"])
        return int(self.runtime.open()(x).shape[1])

    def summary(self) -> dict:
        """backend that ran (None if every image came from the cache), images read from the
        cache and images computed."""
        return {
            "backend": self.runtime.name,
            "device": str(self.runtime.device),
            "cached": sum(s.served for s in self.stores),
            "computed": self.runtime.images,
        }


def feature_engine(
    net: torch.nn.Module,
    spec,
    data_config: dict,
    *,
    backend: str = "auto",
    device: str = "auto",
    cache: bool = True,
    draft: bool = True,
) -> Engine:
    from .cache import cache_root
    from .features import resolve_device

    dev = resolve_device(device)
    chosen = choose_backend(backend, dev)
    root = cache_root() if cache else None
    notes: list[str] = []

    def opener():
        return open_runtime(
            net, spec, data_config, backend=backend, device=dev, cache_root=root, notes=notes
        )

    return Engine(
        net=net,
        spec=spec,
        data_config=data_config,
        runtime=LazyRuntime(opener, dev),
        cache_root=root,
        draft=draft,
        precision=precision(chosen, dev),
        notes=notes,
    )
