"""How features get computed for one cut: a lazily opened runtime plus the feature cache.
Free of torch so that warm runs (tlearn.warm) can use it too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.runtime.ort import (
    LazyRuntime,
)


def feature_engine(net, spec, data_config: dict, run) -> Engine:
    """How features are computed for `run` (core.options.RunOptions) with the torch
    feature network `net`: backend + feature cache."""
    # the cold path: torch, and the exporter for the ONNX graph
    from tlearn.cache import cache_root
    from tlearn.runtime.device import choose_backend, precision, resolve_device
    from tlearn.runtime.export import open_runtime
    from tlearn.runtime.transforms import pixel_path

    backend, device, cache, draft = run.backend, run.device, run.cache, run.draft

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
        from tlearn.cache import FeatureStore

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
