"""Scores of a saved model for images or feature rows, shared by predict and evaluate:
linear heads on features from the engine (warm when possible), neural heads and TTA
through torch (jobs.torch_scores, imported only then)."""

from __future__ import annotations

import numpy as np

from tlearn.core.errors import UsageError
from tlearn.core.options import RunOptions
from tlearn.data.imageset import ImageSet
from tlearn.features.engine import SavedCut, open_engine
from tlearn.heads.linear import LinearHead
from tlearn.modeldir import SavedModel


def saved_features(saved: SavedModel, images: ImageSet, run: RunOptions, stage: str):
    """Features of `images` at the model's cut, through the engine (warm when possible)."""
    engine = open_engine(SavedCut(saved.cut, saved.data_config), run)
    return engine.extract(images.paths, run, stage=stage)  # preprocessing exactly as in fit


def linear_head(saved: SavedModel) -> LinearHead:
    return LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)


def refuse_tta_on_features(tta: str) -> None:
    if tta != "none":
        raise UsageError(f"--tta {tta} needs images, not a features table; use --tta none")


def feature_scores(saved: SavedModel, head: LinearHead | None, X: np.ndarray) -> np.ndarray:
    if len(X) == 0:
        return np.zeros((0, len(saved.classes)))
    if head is not None:
        return head.scores(X)
    # a neural head: torch
    from tlearn.jobs.torch_scores import nn_scores_from_features

    return nn_scores_from_features(saved, X)


def scored_images(saved: SavedModel, paths, tta: str, run: RunOptions, stage: str):
    """Scores through torch (neural head or TTA), for every readable image of `paths`."""
    # neural heads and TTA run in torch
    from tlearn.jobs.torch_scores import score_images

    return score_images(
        saved,
        paths,
        tta=tta,
        batch_size=run.batch_size,
        device=run.device,
        workers=run.workers,
        progress=run.bar(stage),
    )
