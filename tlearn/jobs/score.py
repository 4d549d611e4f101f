"""Scores of a saved model for images or feature rows, shared by predict and evaluate.

Linear heads, and neural heads whose backbone stayed frozen, score pooled features from
the engine (warm when possible: no torch import) with the head in numpy. Fine-tuned
backbones and test-time augmentation run in torch (jobs.torch_scores, imported only
then).

Per image a model gives: the head's own scores (`score`: SVM margins, or the softmax /
sigmoid of logistic-regression and neural logits), probabilities (calibrated when the
model has a calibration, heads.posthoc), and an out-of-distribution score. They travel
packed side by side in one array (`ModelScorer.packed`), so batching, sharding and
test-time augmentation (which averages each column over the views) treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tlearn.core.errors import ArtifactError, UsageError
from tlearn.core.options import RunOptions
from tlearn.data.imageset import ImageSet, Skipped
from tlearn.features.engine import SavedCut, open_engine
from tlearn.heads.calibration import sigmoid
from tlearn.heads.linear import LinearHead
from tlearn.heads.neural import head_logits, softmax
from tlearn.modeldir import SavedModel
from tlearn.scale.shard import score_by_batch


@dataclass
class Outputs:
    """Per image: the head's scores, probabilities (None: an SVM without calibration)
    and out-of-distribution scores (None: the model has no OOD scorer)."""

    raw: np.ndarray  # (n, K)
    probabilities: np.ndarray | None  # (n, K); rows sum to 1 unless multi-label
    ood: np.ndarray | None  # (n,)


class ModelScorer:
    """How a saved model turns pooled features into per-class scores, probabilities and
    an out-of-distribution score."""

    def __init__(self, saved: SavedModel):
        self.saved = saved
        self.multi_label = saved.task == "multi-label"
        self.linear = None if saved.is_nn else linear_head(saved)
        head_probs = saved.is_nn or self.linear.kind == "logreg"
        self.kind = "probability" if head_probs else "svm margin"
        self.posthoc = saved.posthoc
        self.calibrated = self.posthoc is not None and self.posthoc.calibrated
        # SVM margins are no probabilities: an SVM has them only once calibrated (a
        # multi-label SVM without calibration thresholds the sigmoid of its margins at 0.5)
        self.has_probabilities = self.calibrated or head_probs or self.multi_label
        self.ood = None if self.posthoc is None else self.posthoc.ood
        # a neural head on a frozen backbone sees exactly the features extraction gives
        self.on_features = not saved.is_nn or saved.backbone is None
        K = len(saved.classes)
        self.width = K * (2 if self.has_probabilities else 1) + (1 if self.ood else 0)

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Decision values: SVM margins or logits (float32, as the head computes them)."""
        if self.linear is not None:
            return self.linear.decision_function(X)
        if not self.on_features:
            raise UsageError(
                "this model fine-tuned its backbone, so features extracted with the original "
                "weights do not fit it; give images instead of a features table"
            )
        cfg = self.saved.config
        return head_logits(cfg["head"], self.saved.tensors, X)

    def raw(self, D: np.ndarray) -> np.ndarray:
        if self.kind == "svm margin":
            return D
        return sigmoid(D).astype(D.dtype) if self.multi_label else softmax(D)

    def probabilities(self, D: np.ndarray) -> np.ndarray | None:
        if self.calibrated:
            return self.posthoc.probabilities(D)
        if self.multi_label:
            return sigmoid(D)
        return softmax(D) if self.kind == "probability" else None

    def packed(self, X: np.ndarray, decision: np.ndarray | None = None) -> np.ndarray:
        """(n, width): scores | probabilities | OOD score, for pooled features X (and the
        head's decision values when computed elsewhere, e.g. in torch)."""
        if len(X) == 0:
            return np.zeros((0, self.width))
        D = self.decision(X) if decision is None else decision
        parts = [np.asarray(self.raw(D), dtype=np.float64)]
        P = self.probabilities(D)
        if P is not None:
            parts.append(np.asarray(P, dtype=np.float64))
        if self.ood is not None:
            parts.append(self.ood.score(X).astype(np.float64)[:, None])
        return np.hstack(parts)

    def unpack(self, A: np.ndarray) -> Outputs:
        K = len(self.saved.classes)
        P = A[:, K : 2 * K] if self.has_probabilities else None
        ood = A[:, -1] if self.ood is not None else None
        return Outputs(A[:, :K], P, ood)

    def scores(self, X: np.ndarray) -> np.ndarray:
        """The head's own per-class scores (margins, or probabilities)."""
        return self.unpack(self.packed(X)).raw


@dataclass
class ImageScores:
    """Scores of the images that could be read (positions in the input list)."""

    indices: np.ndarray
    outputs: Outputs
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


def refuse_nonfinite_outputs(outputs: Outputs, paths, model) -> Outputs:
    """`outputs` when its scores and probabilities are all finite (refuse_nonfinite)."""
    refuse_nonfinite(outputs.raw, paths, model)
    if outputs.probabilities is not None:
        refuse_nonfinite(outputs.probabilities, paths, model)
    return outputs


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
        packed = score_by_batch(scorer.packed, feats.X, batch_of, scorer.width)
        return ImageScores(feats.indices, scorer.unpack(packed), feats.skipped, list(feats.notes))
    # neural heads on fine-tuned backbones and TTA run in torch
    from tlearn.jobs.torch_scores import score_images as torch_scores

    scored = torch_scores(
        saved,
        images.paths,
        scorer.packed,
        scorer.width,
        tta=tta,
        batch_size=run.batch_size,
        device=run.device,
        workers=run.workers,
        progress=run.bar(stage),
    )
    return ImageScores(scored.indices, scorer.unpack(scored.scores), scored.skipped)


def score_features(scorer: ModelScorer, X: np.ndarray, batch_size: int) -> Outputs:
    """Outputs for a features table, a batch at a time as a single run batches them."""
    batch_of = np.arange(len(X)) // max(1, batch_size)
    return scorer.unpack(score_by_batch(scorer.packed, X, batch_of, scorer.width))
