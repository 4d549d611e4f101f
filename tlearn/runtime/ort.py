"""ONNX Runtime inference on an exported cut network, without importing torch.

Kept apart from tlearn.runtime (which exports with torch) so that a run whose cut was
exported earlier opens the cached graph and computes features with no torch import at
all: starting Python and importing torch and timm costs seconds on a small CPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tlearn.core.hashing import doc_sha256, file_blake2b
from tlearn.core.stages import FORWARD
from tlearn.core.system import cpu_cores, dist_env, dist_version, threads_per_rank
from tlearn.core.version import __version__

ONNX_OPSET = 17
ONNX_FORMAT = 1  # bump when the exported graph's inputs/outputs change meaning
TMP_PREFIX = "tlearn-onnx-"


class CpuDevice:
    """Stands in for torch.device("cpu") where torch is not imported."""

    type = "cpu"

    def __str__(self) -> str:
        return "cpu"


def device_type(device) -> str:
    return getattr(device, "type", str(device))


def cpu_streams() -> int:
    """Concurrent single-image runs on the CPU: one per core, or under torchrun the
    cores of this machine divided by its ranks (TLEARN_NUM_THREADS overrides), so ranks
    sharing a machine do not oversubscribe it."""

    env = dist_env()
    return threads_per_rank(env) if env is not None else cpu_cores()


def ort_installed() -> bool:
    # Without importing it: a run served wholly from the cache never needs it.
    return importlib.util.find_spec("onnxruntime") is not None


def ort_providers() -> list[str]:
    try:
        # onnxruntime costs ~0.3 s: a run served from the cache never opens it
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


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
        device,
        *,
        streams: int | None = None,
        threads: int | None = None,
        micro_batch: int = 1,
        transform=None,
    ):
        # onnxruntime costs ~0.3 s: a run served from the cache never opens it
        import onnxruntime as ort

        self.device = device
        self.transform = transform  # set for a graph exported with PixelInput
        if streams is None:
            streams = cpu_streams() if device_type(device) == "cpu" else 1
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
        if device_type(device) == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self._pool = None
        if self.streams > 1:
            # session.run releases the GIL and is safe to call from several threads.
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="tlearn-ort")

    def _run(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: arr})[0]

    def __call__(self, x) -> np.ndarray:
        # numpy from the decoding pool, or a CPU tensor from torch's DataLoader
        arr = np.ascontiguousarray(x if isinstance(x, np.ndarray) else x.detach().cpu().numpy())
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


class Ready:
    """Features already computed: what `submit` returns for a runtime that computes a
    batch as it is given (every CPU runtime)."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def result(self) -> np.ndarray:
        return self.features


class LazyRuntime:
    """Opens the real runtime on the first batch, so a run served wholly from the feature
    cache never loads ONNX Runtime or exports anything. `stages` (core.stages.Stages, set
    by the engine) gets the forward time, or the runtime's own finer stages."""

    def __init__(
        self,
        opener: Callable[[], object],
        device,
        transform=None,
    ):
        self._opener = opener
        self._runtime = None
        self.device = device
        self.transform = transform  # what the decoding workers must produce (None: float)
        self.images = 0
        self.stages = None

    @property
    def opened(self) -> bool:
        return self._runtime is not None

    @property
    def name(self) -> str | None:
        return self._runtime.name if self._runtime is not None else None

    @property
    def in_flight(self) -> int:
        """Batches the runtime may hold on its device at once (1: computed when given)."""
        return getattr(self._runtime, "in_flight", 1)

    def open(self):
        if self._runtime is None:
            self._runtime = self._opener()
            if hasattr(self._runtime, "stages"):
                self._runtime.stages = self.stages
        return self._runtime

    def __call__(self, x) -> np.ndarray:
        runtime = self.open()
        self.images += len(x)
        return runtime(x)

    def submit(self, x):
        """Start computing a batch; `.result()` of the returned object gives its features."""
        runtime = self.open()
        self.images += len(x)
        submit = getattr(runtime, "submit", None)
        if submit is not None:
            return submit(x)
        t0 = time.perf_counter()
        features = runtime(x)
        if self.stages is not None:
            self.stages.add(FORWARD, time.perf_counter() - t0)
        return Ready(features)


def onnx_key(spec, data_config: dict, pixels: bool) -> str:
    """Everything that determines the exported graph, hashed."""
    doc = {
        "format": ONNX_FORMAT,
        "cut": spec.identity(),
        "input_size": list(data_config["input_size"]),
        "input": "uint8-nhwc" if pixels else "float32-nchw",
        "normalize": [data_config["mean"], data_config["std"]] if pixels else None,
        "opset": ONNX_OPSET,
        "exporter": "torchscript",
        "torch": dist_version("torch"),
        "tlearn": __version__,
    }
    return doc_sha256(doc)


def onnx_path(root: Path, spec, data_config: dict, pixels: bool) -> Path:
    """Where the cache keeps the exported graph of this cut."""
    return Path(root) / "onnx" / f"{spec.model}-{onnx_key(spec, data_config, pixels)[:20]}.onnx"


def graph_intact(path: Path) -> bool:
    """The cached graph's bytes match the blake2b digest its .json sidecar recorded when
    it was exported (False without one: damaged, or cached before digests)."""
    try:
        doc = json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
        return isinstance(doc, dict) and doc.get("blake2b") == file_blake2b(path)
    except (OSError, ValueError, RecursionError):
        return False


def discard_graph(path: Path, notes: list[str] | None) -> None:
    """Delete a cached graph that failed graph_intact, with a note; it is exported again."""
    if notes is not None:
        notes.append(
            f"cached ONNX graph {Path(path).name} was damaged or unchecked (no matching "
            "checksum); discarded and exported again"
        )
    for p in (Path(path), Path(path).with_suffix(".json")):
        with contextlib.suppress(OSError):
            p.unlink()
