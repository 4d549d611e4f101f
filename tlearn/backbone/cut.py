"""Cutting a backbone: the network computed only up to the chosen layer(s), the one
pooling that turns its maps into vectors, and the CutSpec that names the result."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tlearn.backbone.layers import resolve_layers
from tlearn.backbone.weights import Backbone
from tlearn.core.errors import UsageError
from tlearn.core.spec import FINAL_LAYER, POOLS, CutSpec

# ----------------------------------------------------------------------------- cutting


def pool_features(fmap: torch.Tensor, pool: str) -> torch.Tensor:
    """Turn a cut feature map into one vector per image."""
    if fmap.ndim == 2:
        return fmap
    if fmap.ndim == 3:  # tokens (B, N, C): pool over tokens
        dims = (1,)
    elif fmap.ndim == 4:
        dims = (2, 3)
    else:
        return fmap.flatten(1)
    if pool == "avg":
        return fmap.mean(dims)
    if pool == "max":
        return fmap.amax(dims)
    if pool == "avgmax":
        return 0.5 * (fmap.mean(dims) + fmap.amax(dims))
    if pool == "catavgmax":
        return torch.cat([fmap.mean(dims), fmap.amax(dims)], dim=1)
    if pool == "flatten":
        return fmap.flatten(1)
    raise UsageError(f"unknown --pool '{pool}'; allowed: {', '.join(POOLS)}")


class CutNetwork(nn.Module):
    """The backbone computed only up to the deepest requested layer, returning the
    unpooled maps there. Uses timm's FX feature extractor (a pruned graph, exportable),
    falling back to forward hooks that stop the forward pass at the cut."""

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.layers = tuple(layers)
        self.model = model
        self.graph = None
        if self.layers == (FINAL_LAYER,):
            return
        inner = [n for n in self.layers if n != FINAL_LAYER]
        try:
            # timm's FX extractor is optional: older timm may lack it
            from timm.models._features_fx import create_feature_extractor

            self.graph = create_feature_extractor(model, return_nodes={n: n for n in inner})
        except Exception:
            self.graph = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.layers == (FINAL_LAYER,):
            return [self.model.forward_features(x)]
        if self.graph is not None and FINAL_LAYER not in self.layers:
            out = self.graph(x)
            return [out[n] for n in self.layers]
        return self._forward_with_hooks(x)

    def _forward_with_hooks(self, x: torch.Tensor) -> list[torch.Tensor]:
        modules = dict(self.model.named_modules())
        wanted = [n for n in self.layers if n != FINAL_LAYER]
        got: dict[str, torch.Tensor] = {}
        need_final = FINAL_LAYER in self.layers

        class _Stop(Exception):
            pass

        def hook(name):
            def fn(module, inp, out):
                got.setdefault(name, out)
                if not need_final and len(got) == len(wanted):
                    raise _Stop

            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in wanted]
        try:
            final = self.model.forward_features(x)
            got[FINAL_LAYER] = final
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return [got[n] for n in self.layers]


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise UsageError(f"unknown --pool '{pool}'; allowed: {', '.join(POOLS)}")
    return pool


def pool_maps(
    model: nn.Module, layers: Sequence[str], maps: Sequence[torch.Tensor], pool: str
) -> list[torch.Tensor]:
    """The one pooling after the cut, for the feature network and the trainable network
    alike: one vector per image and layer. At `final` with avg pooling the model's own
    pooling runs (e.g. token pooling for ViTs, avg for CNNs)."""
    vecs = []
    for layer, fmap in zip(layers, maps, strict=True):
        if layer == FINAL_LAYER and pool == "avg":
            vecs.append(model.forward_head(fmap, pre_logits=True))
        else:
            vecs.append(pool_features(fmap, pool))
    return vecs


def join_vectors(vecs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several layers' pooled vectors side by side (mid-level texture + high-level shape)."""
    return torch.cat(list(vecs), dim=1) if len(vecs) > 1 else vecs[0]


class FeatureNetwork(nn.Module):
    """Cut network + pooling: images in, one feature vector per image out. With several
    layers the pooled vectors are concatenated."""

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str):
        super().__init__()
        self.cut = CutNetwork(model, layers)
        self.pool = check_pool(pool)
        self.model = model

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        return pool_maps(self.model, self.cut.layers, self.cut(x), self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return join_vectors(self.pooled(x))


def cut_spec(backbone: Backbone, layers: Sequence[str], pool: str) -> CutSpec:
    """The CutSpec of a loaded backbone cut at resolved `layers`: the one place a spec is
    made from a network (feature extraction, the sweep and fine-tuning alike)."""
    return CutSpec(
        model=backbone.name,
        weights_source=backbone.weights.source,
        weights_sha256=backbone.weights.sha256,
        layers=tuple(layers),
        pool=check_pool(pool),
    )


def feature_network(
    backbone: Backbone, layers, pool: str = "avg"
) -> tuple[FeatureNetwork, CutSpec]:
    """The feature network for a request's layers (names, stage indices, final) and its
    CutSpec."""
    names = resolve_layers(backbone.model, layers)
    return FeatureNetwork(backbone.model, names, pool).eval(), cut_spec(backbone, names, pool)


def layer_dims(net: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Length of each layer's pooled vector for one image: one zero image through
    `net.pooled` (a FeatureNetwork or a transfer.TransferNet), in eval mode."""
    was = net.training
    net.eval()
    try:
        with torch.inference_mode():
            vecs = net.pooled(torch.zeros(1, *input_shape))
    finally:
        net.train(was)
    return tuple(int(v.shape[1]) for v in vecs)


def feature_dim(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Length of the network's feature vector (all layers joined) for one image."""
    return sum(layer_dims(net, input_shape))
