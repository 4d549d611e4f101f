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
    return "onnx" if device.type == "cpu" and _ort_installed() else "torch"


def _ort_installed() -> bool:
    # Without importing it: a run served wholly from the cache never needs it.
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


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
    from .preprocess import split_eval_transform

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
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4 and x.dtype != torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.amp),
        ):
            y = self.net(x)
        return y.float().cpu().numpy()


class OnnxRuntime:
    """ONNX Runtime inference on an exported cut network.

    On CPU the batch is split into single images run concurrently, one per core, by a
    session with one thread per run (data parallelism), instead of one run of the whole
    batch with the cores splitting every operator (intra-op parallelism). Measured on 2
    cores: 1.3x the images/s for the full network and 2x at the middle stage, likely
    because an early layer's large maps for one image stay in a core's cache, and no
    thread waits at an operator barrier for a core a decoding worker took.
    `streams=1` gives one run of the whole batch on `threads` intra-op threads."""

    name = "onnx"

    def __init__(
        self,
        model_path: str | Path,
        device: torch.device,
        *,
        streams: int | None = None,
        threads: int | None = None,
        micro_batch: int = 1,
        transform=None,
    ):
        import onnxruntime as ort

        self.device = device
        self.transform = transform  # set for a graph exported with PixelInput
        if streams is None:
            streams = cpu_cores() if device.type == "cpu" else 1
        self.streams = max(1, streams)
        self.micro_batch = max(1, micro_batch)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = 1 if self.streams > 1 else (threads or cpu_cores())
        so.inter_op_num_threads = 1
        # Decoding runs in worker processes beside the session: spinning idle threads would
        # take their CPU time.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self._pool = None
        if self.streams > 1:
            from concurrent.futures import ThreadPoolExecutor

            # session.run releases the GIL and is safe to call from several threads.
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="tlearn-ort")

    def _run(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: arr})[0]

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        arr = np.ascontiguousarray(x.detach().cpu().numpy())
        if self._pool is None or len(arr) <= self.micro_batch:
            return self._run(arr)
        step = self.micro_batch
        parts = self._pool.map(self._run, [arr[i : i + step] for i in range(0, len(arr), step)])
        return np.concatenate(list(parts))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class LazyRuntime:
    """Opens the real runtime on the first batch, so a run served wholly from the feature
    cache never loads ONNX Runtime or exports anything."""

    def __init__(
        self,
        opener: Callable[[], TorchRuntime | OnnxRuntime],
        device: torch.device,
        transform=None,
    ):
        self._opener = opener
        self._runtime: TorchRuntime | OnnxRuntime | None = None
        self.device = device
        self.transform = transform  # what the decoding workers must produce (None: float)
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


def onnx_key(spec, data_config: dict, pixels: bool) -> str:
    """Everything that determines the exported graph, hashed."""
    cut = spec.to_dict()
    if cut.get("weights_sha256"):
        cut.pop("weights_source", None)  # same weights from another path: same graph
    doc = {
        "format": ONNX_FORMAT,
        "cut": cut,
        "input_size": list(data_config["input_size"]),
        "input": "uint8-nhwc" if pixels else "float32-nchw",
        "normalize": [data_config["mean"], data_config["std"]] if pixels else None,
        "opset": ONNX_OPSET,
        "exporter": "torchscript",
        "torch": torch.__version__,
        "tlearn": __version__,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


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
        tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        path = tmpdir / "model.onnx"
        try:
            export_onnx(net, data_config, path, pixels)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return path
    key = onnx_key(spec, data_config, pixels is not None)
    folder = Path(cache_root) / "onnx"
    path = folder / f"{spec.model}-{key[:20]}.onnx"
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
    from .fsutil import write_json

    with contextlib.suppress(OSError):
        write_json(
            path.with_suffix(".json"),
            {
                "key": key,
                "cut": spec.to_dict(),
                "input_size": list(data_config["input_size"]),
                "input": "uint8-nhwc" if pixels is not None else "float32-nchw",
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
                if path.parent.name.startswith(_TMP_PREFIX):  # not cached: remove
                    shutil.rmtree(path.parent, ignore_errors=True)
        except Exception as e:  # any exporter/ORT failure: torch computes the same features
            if notes is not None:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                notes.append(
                    f"ONNX export of {spec.model} at {','.join(spec.layers)} failed "
                    f"({type(e).__name__}: {msg[:120]}); using torch"
                )
    return TorchRuntime(net, device, pixels)


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
        x = example_input(self.data_config, 1, self.runtime.transform is not None)
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
    pixels = pixel_path(data_config)

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
