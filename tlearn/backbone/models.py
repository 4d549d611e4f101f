"""timm architectures: creating one, listing them (with what is usable offline), and
the preprocessing (data config) resolved from the model itself."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import timm
from torch import nn

from tlearn.core.errors import ModelError
from tlearn.core.spec import bundled_weights_file


def hub_cached(model_name: str) -> bool:
    """True when timm's pretrained weights for the model are in the local HF cache."""
    try:
        # optional: a model without hub weights needs neither
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
    except Exception:
        return False
    if cfg is None or not cfg.hf_hub_id:
        return False
    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
        if isinstance(hit, str):
            return True
    return False


def offline_available(model_name: str) -> bool:
    return bundled_weights_file(model_name) is not None or hub_cached(model_name)


def create_model(model_name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise ModelError(unknown_model_message(model_name)) from None
        raise


def unknown_model_message(model_name: str) -> str:
    close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown model '{model_name}'{hint} (list them with: tlearn models PATTERN)"


def data_config_for(model: nn.Module) -> dict:
    """timm's resolved eval preprocessing for the model, as plain JSON-able values."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


@dataclass
class ModelListing:
    name: str
    offline: bool
    bundled: bool = False
    extra: dict = field(default_factory=dict)


def list_models(pattern: str | None = None) -> list[ModelListing]:
    pat = pattern or "*"
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    names = timm.list_models(pat)
    return [
        ModelListing(
            name=n,
            offline=offline_available(n),
            bundled=bundled_weights_file(n) is not None,
        )
        for n in names
    ]
