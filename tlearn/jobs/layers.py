"""`tlearn layers`: every place a network can be cut, ending with `final` (the model's
own pooled features, the default cut), and optionally a picture of its blocks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from tlearn.backbone.cut import pool_maps
from tlearn.backbone.layers import LayerInfo, list_layers, overview_layers
from tlearn.backbone.models import create_model, data_config_for, unknown_model_message
from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import ModelError
from tlearn.core.spec import FINAL_LAYER
from tlearn.report.plots import plot_layers


@dataclass
class LayerTable:
    model: str
    input_size: int
    layers: list[LayerInfo]  # in the order they are computed; the last one is `final`
    plot: Path | None = None


def layer_table(model: str, input_size: int | None = None, plot=None) -> LayerTable:
    """The cut points of `model` at `input_size` (default: the model's), with output
    shape, reduction, cumulative parameters and GFLOPs per image; `plot`: a PNG of them."""
    if plot is not None:
        check_output_parent(plot, "--plot")
    if model not in timm.list_models():
        raise ModelError(unknown_model_message(model))
    net = create_model(model, pretrained=False).eval()
    size = input_size or data_config_for(net)["input_size"][1]
    layers = list_layers(net, size)
    if plot is not None:
        plot_layers(overview_layers(net, layers), plot, f"{model} at {size}x{size}")
    return LayerTable(model, size, [*layers, final_layer(net, layers, size)], plot)


def final_layer(net: torch.nn.Module, layers: list[LayerInfo], size: int) -> LayerInfo:
    """`final`: what the model itself pools from its last map (the default --layer)."""
    with torch.inference_mode():
        fmap = net.forward_features(torch.zeros(1, 3, size, size))
        (vec,) = pool_maps(net, [FINAL_LAYER], [fmap], "avg")
    last = layers[-1] if layers else None
    return LayerInfo(
        name=FINAL_LAYER,
        type="pooled features",
        shape=tuple(vec.shape[1:]),
        reduction=None,
        params=last.params if last else 0,
        gflops=last.gflops if last else 0.0,
        stage=None,
    )
