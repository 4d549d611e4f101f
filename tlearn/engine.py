"""How features get computed for one cut: a lazily opened runtime plus the feature cache,
warm (no torch) or cold.

Warm runs: compute features with no torch, timm or torchvision import at all.

Starting Python and importing torch and timm takes ~3-4 s on a small CPU (timm alone pulls
in torchvision, which imports torch._dynamo), more than extracting a few hundred images
or fitting an SVM on cached features. Everything a CPU run through ONNX Runtime needs
from them is remembered in the cache directory the first time:

- what a request (model, weights file, layer, pool) resolved to: the CutSpec and timm's
  data config (`resolved/cut-<key>.json`);
- the PIL steps of that data config's eval transform (`resolved/pixels-<key>.json`);
- the exported graph of the cut (`onnx/`, see tlearn.runtime.cached_onnx).

When all three are there, `extract`, `fit` (svm/logreg), `predict` and `evaluate` open
ONNX Runtime on the cached graph and decode with plain worker processes. The features
are the same bits as a cold run's: the same graph, the same pixels (tlearn.pixels is
tested against timm's transform), the same feature cache. Anything else (a GPU, the
torch backend, hub weights, `--no-cache`) takes the ordinary path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.cache.remembered import recall_cut, recall_pixels, request_key
from tlearn.core.hashing import file_sha256
from tlearn.core.spec import CutSpec, bundled_weights_file
from tlearn.core.system import cpu_only
from tlearn.runtime.ort import (
    LazyRuntime,
)


def feature_engine(net, spec, data_config: dict, run) -> Engine:
    """How features are computed for `run` (core.options.RunOptions) with the torch
    feature network `net`: backend + feature cache."""
    # the cold path: torch, and the exporter for the ONNX graph
    from tlearn.cache.store import cache_root
    from tlearn.runtime.device import choose_backend, precision, resolve_device
    from tlearn.runtime.export import open_runtime
    from tlearn.runtime.transforms import pixel_path

    backend, device, cache, draft = run.backend, run.device, run.cache, run.draft

    dev = resolve_device(device)
    chosen = choose_backend(backend, dev)
    root = cache_root() if cache else None
    notes: list[str] = []
    pixels = pixel_path(data_config)
    from tlearn.cache.remembered import remember_pixels

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


@dataclass
class Engine:
    """How features get computed for one cut: a lazily opened runtime and, unless disabled,
    the feature cache. `kwargs()` are the extra arguments for features.iter_features."""

    net: object  # the torch feature network; None for a warm run (tlearn.warm)
    spec: object
    data_config: dict
    runtime: LazyRuntime
    cache_root: Path | None
    draft: bool
    precision: str
    notes: list[str]
    stores: list = field(default_factory=list)

    def _open_store(self):
        from tlearn.cache.store import FeatureStore

        return FeatureStore.open(
            self.cache_root, self.spec, self.data_config, draft=self.draft, precision=self.precision
        )

    def kwargs(self) -> dict:
        store = None
        if self.cache_root is not None:
            store = self._open_store()
            store.notes = self.notes
            self.stores.append(store)
        return {"runtime": self.runtime, "cache": store, "draft": self.draft}

    def feature_dim(self) -> int:
        """Length of one feature vector: from the cache when it has this cut, else one
        zero image through the runtime (which a cold run opens anyway)."""
        if self.cache_root is not None and not self.runtime.opened:
            store = self._open_store()
            if store.dim is not None:
                return store.dim
        c, h, w = self.data_config["input_size"]
        if self.runtime.transform is not None:  # uint8 NHWC pixels
            x = np.zeros((1, h, w, c), dtype=np.uint8)
        else:
            import torch

            x = torch.zeros(1, c, h, w)
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


@dataclass
class Warm:
    """A cut that can run with no torch import."""

    spec: CutSpec
    data_config: dict
    onnx: Path
    pixels: tuple
    seed: int = 0  # of a random init (--weights none), for the fallback below


def _warm(root: Path, spec: CutSpec, data_config: dict) -> Warm | None:
    from tlearn.runtime.ort import onnx_path

    pixels = recall_pixels(root, data_config)
    if pixels is None:
        return None
    path = onnx_path(root, spec, data_config, pixels=True)
    return Warm(spec, data_config, path, pixels) if path.is_file() else None


def _usable(run) -> Path | None:
    """The cache root when `run` (pipeline.RunOptions) may take the warm path."""
    from tlearn.runtime.ort import ort_installed

    if not run.cache or run.backend not in ("auto", "onnx") or not cpu_only(run.device):
        return None
    if os.environ.get("TLEARN_NO_WARM") or not ort_installed():
        return None
    from tlearn.cache.store import cache_root

    return cache_root()


def for_request(model: str, weights: str, layers, pool: str, seed: int, run) -> Warm | None:
    root = _usable(run)
    if root is None:
        return None
    key = request_key(model, weights, layers, pool, seed)
    found = recall_cut(root, key) if key is not None else None
    warm = _warm(root, *found) if found is not None else None
    if warm is not None:
        warm.seed = seed
    return warm


def _weights_unchanged(spec: CutSpec) -> bool:
    """The weights a saved model names are still there with the same sha256. The cached
    graph (keyed by that sha256) would compute the right features either way, but a model
    whose weights are gone or changed must fail the same way warm or cold."""
    src = spec.weights_source
    if src == "none":
        return True
    if src.startswith("bundled:"):
        path = bundled_weights_file(spec.model)
    elif src.startswith("timm:"):
        return False  # hub weights: only loading them tells
    else:
        path = Path(src)
    return path is not None and path.is_file() and file_sha256(path) == spec.weights_sha256


def for_spec(spec: CutSpec, data_config: dict, run) -> Warm | None:
    """For a saved model (predict, evaluate)."""
    root = _usable(run)
    if root is None or not _weights_unchanged(spec):
        return None
    return _warm(root, spec, data_config)


def engine(warm: Warm, run):
    """An Engine (tlearn.engine) running the cached graph on the CPU."""
    from tlearn.cache.store import cache_root
    from tlearn.runtime.ort import CpuDevice, LazyRuntime, OnnxRuntime

    device = CpuDevice()
    steps = warm.pixels[0]
    notes: list[str] = []

    def opener():
        try:
            return OnnxRuntime(warm.onnx, device, transform=steps)
        except Exception as e:  # a damaged cache file: rebuild it the cold way
            notes.append(
                f"cached ONNX graph {warm.onnx.name} could not be opened "
                f"({type(e).__name__}); exported it again"
            )
            with contextlib.suppress(OSError):
                warm.onnx.unlink()
            return _cold_runtime(warm, notes)

    return Engine(
        net=None,
        spec=warm.spec,
        data_config=warm.data_config,
        runtime=LazyRuntime(opener, device, steps),
        cache_root=cache_root(),
        draft=run.draft,
        precision="fp32",
        notes=notes,
    )


def _cold_runtime(warm: Warm, notes: list[str]):
    """The runtime a cold run would open for this cut (imports torch)."""
    import torch

    from tlearn.backbone.cut import FeatureNetwork
    from tlearn.backbone.weights import backbone_for_spec
    from tlearn.cache.store import cache_root
    from tlearn.runtime.export import open_runtime
    from tlearn.runtime.transforms import pixel_path

    backbone = backbone_for_spec(warm.spec, seed=warm.seed)
    net = FeatureNetwork(backbone.model, warm.spec.layers, warm.spec.pool).eval()
    return open_runtime(
        net,
        warm.spec,
        warm.data_config,
        device=torch.device("cpu"),
        cache_root=cache_root(),
        notes=notes,
        pixels=pixel_path(warm.data_config),
    )
