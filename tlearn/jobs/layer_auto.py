"""`fit --layer auto`: extract every candidate layer in one pass, sweep on the training
features (CV only), keep the best layer's columns."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from tlearn.backbone.cut import layer_dims
from tlearn.backbone.layers import Candidate, candidate_layers
from tlearn.backbone.weights import Backbone, open_backbone
from tlearn.core.deadline import format_duration
from tlearn.core.errors import UsageError
from tlearn.core.options import RunOptions
from tlearn.features.engine import CutRequest, open_engine
from tlearn.jobs.sources import FeatureSource, LabelledFeatures
from tlearn.jobs.sweep import (
    PAIR_POOL,
    LayerFeatures,
    SweepResult,
    choose_cut,
    cv_folds,
    score_cut,
    sweep_features,
)

# ----------------------------------------------------------------------------- fit --layer auto


class AutoLayerSource(FeatureSource):
    """Feature source for `fit --layer auto`: extracts every candidate layer in one pass,
    then `choose` sweeps on the training features only (CV) and keeps the best layer's
    columns for training and validation alike, so no image goes through the network twice.
    """

    def __init__(self, model, weights, pool, run: RunOptions, seed: int, *, head, C, folds=5):
        super().__init__(model, weights, None, pool, run, seed)
        self.head, self.C, self.folds = head, C, folds
        self.candidates: list[Candidate] = []
        self.dims: tuple[int, ...] = ()
        self.backbone: Backbone | None = None

    def _open(self):
        if self.engine is None:
            self.backbone = open_backbone(self.model, self.weights, self.seed)
            self.candidates = candidate_layers(self.backbone.model, "stages")
            names = [c.name for c in self.candidates]
            request = CutRequest(self.backbone.name, layers=names, pool=self.pool)
            self.engine = open_engine(request, self.run, backbone=self.backbone)
            self.spec, self.data_config = self.engine.spec, self.engine.data_config
            self.dims = layer_dims(self.engine.network, self.data_config["input_size"])

    def from_table(self, path) -> LabelledFeatures:
        raise UsageError(
            f"--layer auto sweeps the backbone's layers, so it needs image folders, not the "
            f"features table {path}; give --layer NAME, or fit on images"
        )

    def choose(self, train: LabelledFeatures, valid: LabelledFeatures | None):
        """Sweep on `train` (CV only), then keep the chosen cut's columns: the best single
        layer, or the best pair when it wins by more than the CV noise (sweep.choose_cut).
        """
        t0 = time.perf_counter()
        feats = LayerFeatures(self.spec.layers, self.dims, np.arange(len(train.y)), train.X)
        scored = self._estimate(train)
        stopped: list[str] = []
        rows, pair_rows, best, best_pair = sweep_features(
            feats,
            train.y,
            train.classes,
            self.candidates,
            head=self.head,
            C=self.C,
            folds=self.folds,
            seed=self.seed,
            progress=self.run.bar("sweep layers"),
            deadline=self.run.deadline,
            stopped=stopped,
            scored=scored,
        )
        folds = cv_folds(train.y, self.folds)
        chosen, choice = choose_cut(best, best_pair, folds)
        result = SweepResult(
            model=self.spec.model,
            weights_source=self.spec.weights_source,
            pool=self.pool,
            head=self.head,
            C=self.C,
            folds=folds,
            seed=self.seed,
            classes=list(train.classes),
            n_images=int(len(train.y)),
            rows=rows,
            pairs=pair_rows,
            best=best,
            best_pair=best_pair,
            seconds=time.perf_counter() - t0,
            metric="mAP" if np.ndim(train.y) == 2 else "accuracy",
            chosen=chosen,
            choice=choice,
            stopped=stopped,
        )
        cols = feats.columns(chosen.layers)
        train.X = np.ascontiguousarray(train.X[:, cols])
        if valid is not None:
            valid.X = np.ascontiguousarray(valid.X[:, cols])
        self.spec = replace(self.spec, layers=chosen.layers)
        return train, valid, result

    def _estimate(self, train: LabelledFeatures) -> dict:
        """Tell the caller how long the sweep will take: the cross-validated fit of the
        widest layer, measured, scaled by the features of every cut to score (the larger
        cuts dominate, and their fits grow about linearly with the features). Returns the
        measured score for the sweep to reuse."""
        if self.run.note is None or not self.dims:
            return {}
        i = int(np.argmax(self.dims))
        name = self.spec.layers[i]
        feats = LayerFeatures(self.spec.layers, self.dims, np.arange(len(train.y)), train.X)
        t0 = time.perf_counter()
        result = score_cut(
            feats.select([name]),
            train.y,
            train.classes,
            head=self.head,
            C=self.C,
            folds=self.folds,
            seed=self.seed,
        )
        per_feature = (time.perf_counter() - t0) / self.dims[i]
        top = sorted(self.dims, reverse=True)[:PAIR_POOL]
        pair_dims = sum(a + b for k, a in enumerate(top) for b in top[k + 1 :])
        seconds = per_feature * (sum(self.dims) + pair_dims)
        self.run.tell(
            f"estimate: the layer sweep takes at most about {format_duration(seconds)} "
            f"({len(self.dims)} layers and pairs of the best {PAIR_POOL}, {len(train.y)} "
            f"images; measured on {name})"
        )
        return {(name,): result}
