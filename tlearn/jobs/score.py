"""Scores of a saved model for images or feature rows, shared by predict and evaluate.

Linear heads, and neural heads whose backbone stayed frozen, score pooled features from
the engine (warm when possible: no torch import) with the head in numpy. Fine-tuned
backbones and test-time augmentation run in torch (jobs.torch_scores, imported only
then)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tlearn.core.errors import ArtifactError, UsageError
from tlearn.core.options import RunOptions
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.features.engine import SavedCut, open_engine
from tlearn.heads.linear import LinearHead
from tlearn.heads.neural import head_logits, softmax
from tlearn.modeldir import SavedModel
from tlearn.scale.shard import score_by_batch


class ModelScorer:
    """How a saved model turns pooled features into per-class scores."""

    def __init__(self, saved: SavedModel):
        self.saved = saved
        self.linear = None if saved.is_nn else linear_head(saved)
        probabilities = saved.is_nn or self.linear.kind == "logreg"
        self.kind = "probability" if probabilities else "svm margin"
        # a neural head on a frozen backbone sees exactly the features extraction gives
        self.on_features = not saved.is_nn or saved.backbone is None

    def scores(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros((0, len(self.saved.classes)))
        if self.linear is not None:
            return self.linear.scores(X)
        if not self.on_features:
            raise UsageError(
                "this model fine-tuned its backbone, so features extracted with the original "
                "weights do not fit it; give images instead of a features table"
            )
        cfg = self.saved.config
        return softmax(head_logits(cfg["head"], self.saved.tensors, X))


@dataclass
class ImageScores:
    """Scores of the images that could be read (positions in the input list)."""

    indices: np.ndarray
    scores: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def refuse_nonfinite(scores: np.ndarray, paths, model) -> np.ndarray:
    """`scores` when all are finite, else ArtifactError naming the model and the first
    image: NaN or infinite scores are never written as predictions or counted."""
    scores = np.asarray(scores)
    bad = ~np.isfinite(scores).all(axis=1) if scores.ndim == 2 else ~np.isfinite(scores)
    if scores.size and bad.any():
        first = paths[int(np.flatnonzero(bad)[0])]
        raise ArtifactError(
            f"{model}: gave NaN or infinite scores for {int(bad.sum())} of {len(bad)} "
            f"image(s) (first: {first}); the model or the features are damaged, nothing "
            "was written; refit the model (or extract the features again)"
        )
    return scores


def linear_head(saved: SavedModel) -> LinearHead:
    return LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)


def refuse_tta_on_features(tta: str) -> None:
    if tta != "none":
        raise UsageError(f"--tta {tta} needs images, not a features table; use --tta none")


def score_images(
    scorer: ModelScorer, images: ImageSet, tta: str, run: RunOptions, stage: str
) -> ImageScores:
    """Per-class scores for every readable image: through the engine and the head on its
    features when the model allows, else through torch (fine-tuned backbone, TTA)."""
    saved = scorer.saved
    if scorer.on_features and tta == "none":
        engine = open_engine(SavedCut(saved.cut, saved.data_config), run)
        feats = engine.extract(images.paths, run, stage=stage)  # preprocessing as in fit
        # scored a batch at a time, as a single run batches them: shards stay bit-equal
        batch_of = np.asarray(feats.indices) // max(1, run.batch_size)
        scores = score_by_batch(scorer.scores, feats.X, batch_of, len(saved.classes))
        return ImageScores(feats.indices, scores, feats.skipped, list(feats.notes))
    # neural heads on fine-tuned backbones and TTA run in torch
    from tlearn.jobs.torch_scores import score_images as torch_scores

    scored = torch_scores(
        saved,
        images.paths,
        tta=tta,
        batch_size=run.batch_size,
        device=run.device,
        workers=run.workers,
        progress=run.bar(stage),
    )
    return ImageScores(scored.indices, scored.scores, scored.skipped)
