"""The neural head as a torch module, for training (heads.neural describes it without
torch: names, shapes, and the forward pass used at predict time)."""

from __future__ import annotations

import torch
from torch import nn

from tlearn.core.errors import UsageError


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
