"""How features get computed for one cut: a lazily opened runtime plus the feature cache.
Free of torch so that warm runs (tlearn.warm) can use it too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.onnxrt import LazyRuntime


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
