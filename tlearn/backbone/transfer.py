"""The trainable network: the backbone computed only up to the cut, pooled, then a new head.

When the model's `forward_features` is a plain sequence of modules (EfficientNet, ResNet,
ConvNeXt, RegNet, MobileNet...), the backbone is run as an explicit chain of modules, with
`nn.Sequential` containers opened up to their blocks. Then the network can be split at any
block boundary: a frozen prefix whose outputs can be computed once and cached, and a
trainable suffix. Other models (ViTs, several cut layers) run through backbone.CutNetwork.
Either way nothing after the cut is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tlearn.backbone.cut import CutNetwork, check_pool, join_vectors, pool_maps
from tlearn.core.spec import FINAL_LAYER
from tlearn.heads.neural_torch import NNHead


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def chain_modules(model: nn.Module, size: int) -> list[tuple[str, nn.Module]] | None:
    """forward_features as an ordered list of (name, module) with plain Sequential containers
    opened, or None when the model is not such a chain (checked numerically)."""
    calls: list[str] = []
    handles = [
        child.register_forward_hook(lambda m, i, o, n=name: calls.append(n))
        for name, child in model.named_children()
    ]
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            want = model.forward_features(x)
    except Exception:
        return None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # Top-level children in the order forward_features runs them, each exactly once.
    if not calls or len(set(calls)) != len(calls) or not isinstance(want, torch.Tensor):
        return None
    children = dict(model.named_children())
    chain: list[tuple[str, nn.Module]] = []

    def add(name: str, module: nn.Module) -> None:
        if _is_plain_sequential(module) and len(module) > 0:
            for child_name, child in module.named_children():
                add(f"{name}.{child_name}", child)
        else:
            chain.append((name, module))

    for name in calls:
        add(name, children[name])
    model.eval()
    try:
        with torch.inference_mode():
            got = x
            for _, m in chain:
                got = m(got)
        ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    except Exception:
        ok = False
    finally:
        model.train(was_training)
    return chain if ok else None


def chain_boundary(chain: Sequence[tuple[str, nn.Module]], layer: str) -> int | None:
    """Number of chain elements computed when `layer` has produced its output."""
    if layer == FINAL_LAYER:
        return len(chain)
    last = None
    for i, (name, _) in enumerate(chain):
        if name == layer or name.startswith(layer + "."):
            last = i
    return None if last is None else last + 1


class TransferNet(nn.Module):
    """Images -> backbone up to the cut -> pooled features -> head -> logits.

    `split` chain elements form the prefix (see forward_prefix / forward_from_prefix);
    the backbone is registered once, as `model`, so state_dict() names are model.* and
    head.*.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        pool: str,
        head: NNHead | None,
        input_size: int,
    ):
        super().__init__()
        check_pool(pool)
        if hasattr(model, "drop_rate"):
            # The new head's --dropout replaces the model's own pre-classifier dropout.
            model.drop_rate = 0.0
        self.model = model
        self.head = head
        self.layers = tuple(layers)
        self.pool = pool
        self.input_size = input_size
        self.input_shape = (3, input_size, input_size)
        chain = chain_modules(model, input_size) if len(self.layers) == 1 else None
        self.chain: list[tuple[str, nn.Module]] | None = None
        self.cut_index = None
        if chain is not None:
            end = chain_boundary(chain, self.layers[0])
            if end is not None:
                self.chain, self.cut_index = list(chain[:end]), end
        # Not registered: it shares the modules of self.model.
        object.__setattr__(self, "_cut", None if self.chain else CutNetwork(model, layers))
        self.split = 0

    # ------------------------------------------------------------------ splitting

    def boundary(self, layer: str) -> int | None:
        return None if self.chain is None else chain_boundary(self.chain, layer)

    def prefix_module_names(self) -> list[str]:
        """Backbone module names (model.*) run by the prefix."""
        return [f"model.{n}" for n, _ in (self.chain or [])[: self.split]]

    # ------------------------------------------------------------------ forward

    def pooled_from_prefix(self, h: torch.Tensor) -> list[torch.Tensor]:
        for _, m in self.chain[self.split :]:
            h = m(h)
        return pool_maps(self.model, self.layers, [h], self.pool)

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One pooled vector per cut layer (backbone.cut.pool_maps, as in extraction)."""
        if self.chain is not None:
            return self.pooled_from_prefix(self.forward_prefix(x))
        return pool_maps(self.model, self.layers, self._cut(x), self.pool)

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        for _, m in self.chain[: self.split]:
            x = m(x)
        return x

    def features_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        return join_vectors(self.pooled_from_prefix(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return join_vectors(self.pooled(x))

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_from_prefix(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def execution_order(net: TransferNet) -> list[str]:
    """Names of the backbone modules (model.*) that own parameters or buffers, in the
    order their forward finishes when computing the features; modules after the cut
    never run and are not listed. Computed once per network."""
    cached = getattr(net, "_execution_order", None)
    if cached is not None:
        return list(cached)
    order: list[str] = []
    seen: set[str] = set()

    def hook(name):
        def fn(m, i, o):
            if name not in seen:
                seen.add(name)
                order.append(name)

        return fn

    handles = []
    for name, m in net.model.named_modules():
        if any(True for _ in m.parameters(recurse=False)) or any(
            True for _ in m.buffers(recurse=False)
        ):
            handles.append(m.register_forward_hook(hook(f"model.{name}" if name else "model")))
    was = net.training
    net.eval()
    try:
        with torch.inference_mode():
            net.features(torch.zeros(1, *net.input_shape))
    finally:
        net.train(was)
        for h in handles:
            h.remove()
    if "model" not in seen and any(True for _ in net.model.parameters(recurse=False)):
        order.insert(0, "model")  # tokens / position embeddings owned by the model itself
    object.__setattr__(net, "_execution_order", tuple(order))
    return order
