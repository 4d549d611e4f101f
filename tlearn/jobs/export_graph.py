"""The whole saved model as one torch module, for `tlearn export`: uint8 RGB pixels
(N, H, W, 3) -> ToTensor + Normalize arithmetic -> the cut backbone (fine-tuned weights
when the model has them) -> the one pooling -> the head -> scores.

`model_scoring` is the ONE place that says what a model's graph outputs and how they
are computed from pooled features: `scores` is always what `tlearn predict` reports
(probabilities for logistic regression and neural heads, SVM margins for an SVM), and
`probabilities` is added when the model has real probabilities. A softmax of SVM margins
is not a probability (it is not calibrated: its values depend on C and the scaling of
the margins), so an SVM model without a calibration exports margins only. A model with
a calibration (heads.posthoc: temperature scaling) exports `probabilities` =
softmax(decision / T), the calibrated probabilities `tlearn predict` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tlearn.backbone.cut import FeatureNetwork
from tlearn.backbone.transfer import TransferNet
from tlearn.core.errors import UsageError
from tlearn.heads.linear import LinearHead
from tlearn.heads.neural_torch import NNHead
from tlearn.jobs.torch_scores import build_backbone
from tlearn.modeldir import SavedModel
from tlearn.runtime.torch_runtime import PixelInput

SCORES = "scores"
PROBABILITIES = "probabilities"


class LinearScores(nn.Module):
    """StandardScaler + linear head (LinearHead.scores in torch): margins, or softmax
    probabilities for logistic regression."""

    def __init__(self, head: LinearHead, softmax: bool | None = None):
        super().__init__()
        # None: as predict reports the head's scores (softmax for logistic regression)
        self.softmax = head.kind == "logreg" if softmax is None else softmax
        for name, value in head.tensors().items():
            self.register_buffer(name, torch.from_numpy(np.asarray(value, dtype=np.float32)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.scaler_mean) / self.scaler_scale
        d = z @ self.coef.T + self.intercept
        return torch.softmax(d, 1) if self.softmax else d


class Softmax(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(features), 1)


class Outputs(nn.Module):
    """One score tensor -> the graph's outputs (the same values twice when they are
    probabilities: `scores` for what predict reports, `probabilities` for what they are)."""

    def __init__(self, score: nn.Module, n_outputs: int):
        super().__init__()
        self.score = score
        self.n_outputs = n_outputs

    def forward(self, features: torch.Tensor):
        s = self.score(features)
        return s if self.n_outputs == 1 else (s, s.clone())


class Calibrated(nn.Module):
    """Decision values -> (what predict reports as `score`, calibrated probabilities)."""

    def __init__(self, decision: nn.Module, temperature: float, score_is_softmax: bool):
        super().__init__()
        self.decision = decision
        self.temperature = float(temperature)
        self.score_is_softmax = score_is_softmax

    def forward(self, features: torch.Tensor):
        d = self.decision(features)
        score = torch.softmax(d, 1) if self.score_is_softmax else d
        return score, torch.softmax(d / self.temperature, 1)


@dataclass
class Scoring:
    """What the graph outputs after the features, and how."""

    module: nn.Module  # pooled features (B, D) -> the outputs, in `outputs` order
    outputs: tuple[str, ...]
    score_kind: str  # what `tlearn predict` calls its scores
    reference: object  # features (numpy or torch) -> scores, as tlearn computes them


def model_scoring(saved: SavedModel) -> Scoring:
    """The model's scoring function from pooled features: the one place the exported
    graph's outputs are decided."""
    if saved.task == "multi-label":
        raise UsageError(
            "export writes multi-class models; a multi-label model's per-label thresholds "
            "are not in the graph yet (use tlearn predict)"
        )
    posthoc = saved.posthoc
    temperature = posthoc.temperature if posthoc is not None else None
    if saved.is_nn:
        head = NNHead(saved.config["head"], int(saved.config["feature_dim"]), len(saved.classes))
        head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in saved.tensors.items()})
        score = Softmax(head.eval())

        def reference(feats):
            with torch.inference_mode():
                return torch.softmax(head(torch.as_tensor(feats)), 1).numpy()

        if temperature is not None:
            score = Calibrated(head.eval(), temperature, True)
            return Scoring(score, (SCORES, PROBABILITIES), "probability", reference)
        return Scoring(Outputs(score, 2), (SCORES, PROBABILITIES), "probability", reference)
    linear = LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)
    probs = linear.kind == "logreg"
    if temperature is not None:
        return Scoring(
            # the decision values in; Calibrated applies the softmaxes
            Calibrated(LinearScores(linear, softmax=False), temperature, probs),
            (SCORES, PROBABILITIES),
            "probability" if probs else "svm margin",
            lambda feats: linear.scores(np.asarray(feats, dtype=np.float32)),
        )
    outputs = (SCORES, PROBABILITIES) if probs else (SCORES,)
    kind = "probability" if probs else "svm margin"
    return Scoring(
        Outputs(LinearScores(linear), len(outputs)),
        outputs,
        kind,
        lambda feats: linear.scores(np.asarray(feats, dtype=np.float32)),
    )


def features_network(saved: SavedModel) -> nn.Module:
    """Images (normalised float NCHW) -> pooled features, the way predict computes them:
    the feature network of the cut for linear heads, the trainable network's feature
    path (fine-tuned backbone included) for neural heads."""
    model = build_backbone(saved)
    if saved.is_nn:
        size = int(saved.data_config["input_size"][1])
        net = TransferNet(model, saved.cut.layers, saved.cut.pool, None, size).eval()
        return _Features(net)
    return FeatureNetwork(model, saved.cut.layers, saved.cut.pool).eval()


class _Features(nn.Module):
    def __init__(self, net: TransferNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class WholeModel(nn.Module):
    """uint8 NHWC pixels -> the model's outputs; `features` alone for the reference."""

    def __init__(self, saved: SavedModel, mean, std):
        super().__init__()
        self.scoring = model_scoring(saved)
        self.features = PixelInput(features_network(saved), mean, std).eval()
        self.head = self.scoring.module.eval()

    def forward(self, pixels: torch.Tensor):
        return self.head(self.features(pixels))

    def reference_scores(self, pixels: torch.Tensor) -> np.ndarray:
        """tlearn's own scores for these pixels: torch features, then the head the way
        predict applies it (numpy for linear heads)."""
        with torch.inference_mode():
            feats = self.features(pixels).float().numpy()
        return np.asarray(self.scoring.reference(feats), dtype=np.float32)
