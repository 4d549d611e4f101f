"""New neural heads on pooled features: `linear` (dropout + one linear layer) and `mlp`
(hidden layers with optional batch norm, ReLU and dropout, then a linear layer).

The head is described by a small JSON-able dict (`head_config`), saved in config.json.
This module is torch-free: the tensor names and shapes a head saves, and its forward
pass in numpy (eval mode), so a model with a frozen backbone predicts warm like an SVM.
heads.neural_torch holds the torch module that trains; a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


BN_EPS = 1e-5  # torch.nn.BatchNorm1d's default eps


def layer_names(config: dict) -> list[tuple[str, str]]:
    """(kind, index) of each layer of the head's nn.Sequential, in order: the names its
    tensors are saved under are layers.<index>.<weight|bias|...>."""
    if config["type"] == "linear":
        return [("dropout", "0"), ("linear", "1")]
    if config["type"] != "mlp":
        raise UsageError(f"unknown neural head '{config['type']}'")
    out, i = [], 0
    for _ in config["hidden"]:
        out.append(("linear", str(i)))
        i += 1
        if config.get("batchnorm"):
            out.append(("batchnorm", str(i)))
            i += 1
        out += [("relu", str(i)), ("dropout", str(i + 1))]
        i += 2
    return [*out, ("linear", str(i))]


def expected_shapes(config: dict, in_dim: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a head (as saved in head.safetensors)."""
    sizes = [*(config["hidden"] if config["type"] == "mlp" else []), n_classes]
    shapes: dict[str, tuple[int, ...]] = {}
    prev, k = in_dim, 0
    for kind, index in layer_names(config):
        name = f"layers.{index}"
        if kind == "linear":
            out = sizes[k]
            shapes[f"{name}.weight"] = (out, prev)
            last = k == len(sizes) - 1
            if last or not config.get("batchnorm"):
                shapes[f"{name}.bias"] = (out,)
            prev, k = out, k + 1
        elif kind == "batchnorm":
            for t in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.{t}"] = (prev,)
            shapes[f"{name}.num_batches_tracked"] = ()
    return shapes


def head_logits(config: dict, tensors: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """The head's logits for pooled features X (B, D), in eval mode (dropout off,
    batch norm with its running statistics), in float32 as torch computes them."""
    x = np.asarray(X, dtype=np.float32)
    for kind, index in layer_names(config):
        name = f"layers.{index}"
        if kind == "linear":
            x = x @ np.asarray(tensors[f"{name}.weight"], np.float32).T
            if f"{name}.bias" in tensors:
                x = x + np.asarray(tensors[f"{name}.bias"], np.float32)
        elif kind == "batchnorm":
            mean = np.asarray(tensors[f"{name}.running_mean"], np.float32)
            var = np.asarray(tensors[f"{name}.running_var"], np.float32)
            w = np.asarray(tensors[f"{name}.weight"], np.float32)
            b = np.asarray(tensors[f"{name}.bias"], np.float32)
            x = (x - mean) / np.sqrt(var + np.float32(BN_EPS)) * w + b
        elif kind == "relu":
            x = np.maximum(x, np.float32(0))
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (probabilities summing to 1)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
