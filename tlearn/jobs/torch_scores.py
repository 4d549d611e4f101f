"""Scores computed with torch: neural-head models (with their fine-tuned backbone when one
was trained) and linear models under test-time augmentation.

TTA averages over the views of each image (runtime.augment.tta_transform): softmax
probabilities for neural heads and logistic regression, decision scores (margins) for
SVMs. With `outputs` (jobs.score.ModelScorer.packed) the pooled features and the head's
decision values of each view go through the model's numpy scoring, and every column it
returns (scores, calibrated probabilities, OOD score) is averaged over the views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tlearn.backbone.cut import FeatureNetwork
from tlearn.backbone.transfer import TransferNet
from tlearn.backbone.weights import backbone_for_spec, open_backbone
from tlearn.core.errors import ArtifactError, DataError
from tlearn.core.options import check_tta
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.heads.linear import LinearHead
from tlearn.heads.neural_torch import NNHead
from tlearn.runtime.augment import tta_transform
from tlearn.runtime.device import resolve_device
from tlearn.runtime.loader import image_loader


@dataclass
class Scored:
    indices: np.ndarray  # positions in the input list of the images that could be read
    scores: np.ndarray  # (n, K)
    score_kind: str
    skipped: list[Skipped] = field(default_factory=list)


def build_backbone(saved):
    """The backbone a model predicts with: the fine-tuned weights saved in the model
    directory, or (frozen backbone) the original weights, checked by sha256."""

    if saved.backbone is None:
        return backbone_for_spec(saved.cut).model
    model = open_backbone(saved.cut.model, "none").model
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in saved.backbone.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ArtifactError(
            f"{saved.path}: backbone weights do not fit the model ({first})"
        ) from None
    return model.eval()


def load_nn_net(saved):
    """The TransferNet of a saved neural-head model, in eval mode."""

    cfg = saved.config
    model = build_backbone(saved)
    size = int(saved.data_config["input_size"][1])
    head = NNHead(cfg["head"], int(cfg["feature_dim"]), len(saved.classes))
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in saved.tensors.items()})
    net = TransferNet(model, saved.cut.layers, saved.cut.pool, head, size)
    return net.eval()


def score_images(
    saved,
    paths: Sequence[str],
    outputs: Callable | None = None,
    width: int | None = None,
    *,
    tta: str = "none",
    batch_size: int = 32,
    device: str = "auto",
    workers: int | None = None,
    progress=None,
) -> Scored:
    """Per-class scores for every readable image; unreadable ones go to `skipped`."""

    check_tta(tta)
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    dev = resolve_device(device)
    if outputs is not None:
        score, kind = _packed_scorer(saved, dev, outputs), "packed"
    elif saved.is_nn:
        net = load_nn_net(saved).to(dev)
        kind = "probability"

        def score(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(net(x).float(), 1)

    else:
        head = LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)
        backbone = _linear_backbone(saved)
        fnet = FeatureNetwork(backbone.model, saved.cut.layers, saved.cut.pool).eval().to(dev)
        kind = "probability" if head.kind == "logreg" else "svm margin"

        def score(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(head.scores(fnet(x).float().cpu().numpy())))

    loader = image_loader(
        paths,
        tta_transform(saved.data_config, tta),
        batch_size=batch_size,
        workers=workers,
        min_size=resize_target(saved.data_config),
        device=dev,
    )
    skipped: list[Skipped] = []
    idx: list[int] = []
    parts: list[np.ndarray] = []
    done = 0
    with torch.inference_mode():
        for batch_idx, x, bad in loader:
            skipped.extend(Skipped(str(paths[i]), r) for i, r in bad)
            if x is not None:
                b, v = x.shape[:2]
                s = score(x.flatten(0, 1).to(dev, non_blocking=True)).cpu()
                parts.append(s.reshape(b, v, -1).mean(1).numpy())
                idx.extend(batch_idx)
            done += len(batch_idx) + len(bad)
            if progress is not None:
                progress(done, len(paths))
    K = width if outputs is not None else len(saved.classes)
    scores = np.concatenate(parts) if parts else np.zeros((0, K), dtype=np.float32)
    return Scored(np.asarray(idx, dtype=np.int64), scores, kind, skipped)


def _packed_scorer(saved, dev, outputs: Callable):
    """x -> outputs(pooled features, decision values) per view, as a tensor."""
    if saved.is_nn:
        net = load_nn_net(saved).to(dev)

        def score(x: torch.Tensor) -> torch.Tensor:
            feats = net.features(x)
            logits = net.head(feats).float().cpu().numpy()
            return torch.from_numpy(outputs(feats.float().cpu().numpy(), logits))

        return score
    backbone = _linear_backbone(saved)
    fnet = FeatureNetwork(backbone.model, saved.cut.layers, saved.cut.pool).eval().to(dev)
    return lambda x: torch.from_numpy(outputs(fnet(x).float().cpu().numpy()))


def _linear_backbone(saved):

    return backbone_for_spec(saved.cut)
