"""New neural heads on pooled features: `linear` (dropout + one linear layer) and `mlp`
(hidden layers with optional batch norm, ReLU and dropout, then a linear layer).

The head is described by a small JSON-able dict (`head_config`), saved in config.json,
from which the same module is rebuilt at predict time; its tensors are checked by name
and shape against that rebuilt module before loading.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tlearn.core.errors import UsageError
from tlearn.core.spec import NN_HEADS

DEFAULT_DROPOUT = {"linear": 0.2, "mlp": 0.5}  # mlp: as in the dropout paper (hidden units)
DEFAULT_HIDDEN = (512,)


def parse_hidden(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """'512' or '512,256' -> (512, 256)."""
    if value is None:
        return DEFAULT_HIDDEN
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            raise UsageError(
                f"--hidden '{value}': use layer sizes separated by commas, e.g. 512 or 512,256"
            ) from None
    else:
        sizes = tuple(int(v) for v in value)
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--hidden '{value}': give one or more positive sizes, e.g. 512,256")
    return sizes


def head_config(
    kind: str,
    *,
    hidden: str | Sequence[int] | None = None,
    dropout: float | None = None,
    batchnorm: bool = False,
) -> dict:
    """Validated hyper-parameters of a head, as stored in config.json["head"]."""
    if kind not in NN_HEADS:
        raise UsageError(f"unknown neural head '{kind}'; allowed: {', '.join(NN_HEADS)}")
    p = DEFAULT_DROPOUT[kind] if dropout is None else float(dropout)
    if not 0 <= p < 1:
        raise UsageError(f"--dropout {dropout}: must be at least 0 and below 1, e.g. 0.5")
    if kind == "linear":
        if hidden is not None:
            raise UsageError("--hidden applies to --head mlp only")
        if batchnorm:
            raise UsageError("--head-bn applies to --head mlp only")
        return {"type": "linear", "dropout": p}
    return {
        "type": "mlp",
        "hidden": list(parse_hidden(hidden)),
        "dropout": p,
        "batchnorm": bool(batchnorm),
    }


class NNHead(nn.Module):
    """Features (B, D) -> logits (B, K)."""

    def __init__(self, config: dict, in_dim: int, n_classes: int):
        super().__init__()
        self.config = dict(config)
        layers: list[nn.Module] = []
        if config["type"] == "linear":
            layers += [nn.Dropout(config["dropout"]), nn.Linear(in_dim, n_classes)]
        elif config["type"] == "mlp":
            prev = in_dim
            for h in config["hidden"]:
                layers.append(nn.Linear(prev, h, bias=not config.get("batchnorm")))
                if config.get("batchnorm"):
                    layers.append(nn.BatchNorm1d(h))
                layers += [nn.ReLU(inplace=True), nn.Dropout(config["dropout"])]
                prev = h
            layers.append(nn.Linear(prev, n_classes))
        else:
            raise UsageError(f"unknown neural head '{config['type']}'")
        self.layers = nn.Sequential(*layers)
        self._init()

    def _init(self) -> None:
        # Small final layer: a new head starts near uniform predictions, so the first
        # steps do not send large gradients into a pretrained backbone.
        last = self.layers[-1]
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def expected_shapes(config: dict, in_dim: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a head (as saved in head.safetensors)."""
    with torch.device("meta"):
        head = NNHead(config, in_dim, n_classes)
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}
