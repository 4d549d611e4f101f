"""Features for batch mappers such as Ray Data's `map_batches`, through the same engine
as `tlearn extract`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tlearn.core.options import RunOptions
from tlearn.core.spec import DEFAULT_MODEL
from tlearn.features.engine import CutRequest, open_engine

# ----------------------------------------------------------------------------- Ray & co


class BatchExtractor:
    """Features for a batch of image paths, for batch mappers such as Ray Data's
    `Dataset.map_batches` (a callable class: the backbone loads once per actor).

    `batch["path"]` holds image paths; the result has one row per input row: "path",
    "features" (float32, NaN where the image could not be read) and "skipped" (the reason,
    or "" for a readable image). The same backbone/cut/pool/preprocessing as
    `tlearn extract` with the same options.
    """

    def __init__(
        self,
        model: str | None = None,
        weights: str = "auto",
        layers=None,
        pool: str = "avg",
        device: str = "auto",
        backend: str = "auto",
    ):
        # The same engine as `tlearn extract` (ONNX Runtime on CPU by default), so features
        # match it bit for bit; no disk cache inside a batch mapper.
        self.run = RunOptions(device=device, backend=backend, cache=False, workers=0)
        request = CutRequest(model or DEFAULT_MODEL, weights, layers, pool)
        self.engine = open_engine(request, self.run)
        self.spec, self.data_config = self.engine.spec, self.engine.data_config
        self.dim = self.engine.feature_dim()

    def __call__(self, batch: dict) -> dict:

        paths = [str(p) for p in batch["path"]]
        # one batch, decoded in this process: the batch mapper parallelises
        run = replace(self.run, batch_size=max(1, len(paths)))
        feats = self.engine.extract(paths, run, stage="extract")
        X = np.full((len(paths), self.dim), np.nan, dtype=np.float32)
        if len(feats.indices):
            X[feats.indices] = feats.X
        reasons = {s.path: s.reason for s in feats.skipped}
        return {
            "path": np.asarray(paths, dtype=object),
            "features": X,
            "skipped": np.asarray([reasons.get(p, "") for p in paths], dtype=object),
        }
