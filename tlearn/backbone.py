"""Backbones: load a timm architecture with weights, list where it can be cut, cut it.

One place resolves weights (`load_backbone`) and one place resolves preprocessing
(`data_config_for`), so `fit` and `predict` cannot drift apart.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from tlearn.core.errors import ModelError, UsageError, WeightsError
from tlearn.core.hashing import file_sha256
from tlearn.core.spec import (
    BUNDLED_WEIGHTS,
    DEFAULT_MODEL,
    FINAL_LAYER,
    CutSpec,
    bundled_weights_file,
)

POOLS = ("avg", "max", "avgmax", "catavgmax", "flatten")


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


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # per image, without batch: (C, H, W) or (N, C) for tokens
    reduction: int | None
    params: int  # cumulative parameters computed up to and including this layer
    gflops: float  # cumulative GFLOPs (2 x multiply-adds of convs and linears)
    stage: int | None = None  # index into timm's feature_info, when this is a stage output


# ----------------------------------------------------------------------------- weights


def _sha256_tensors(state_dict: dict) -> str:
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _hub_cached(model_name: str) -> bool:
    """True when timm's pretrained weights for the model are in the local HF cache."""
    try:
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
    return bundled_weights_file(model_name) is not None or _hub_cached(model_name)


def _read_state_dict(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

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


def _apply_state_dict(model: nn.Module, sd: dict, where: str) -> None:
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


def _create(model_name: str, **kwargs) -> nn.Module:
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


def load_backbone(model_name: str = DEFAULT_MODEL, weights: str = "auto") -> Backbone:
    """Create `model_name` with weights from `weights`: "auto", "none" or a file path.

    auto = the bundled offline package when there is one, else timm's pretrained
    weights (local cache first). Never falls back to random weights.
    """
    if model_name not in timm.list_models():
        raise ModelError(unknown_model_message(model_name))
    if weights == "none":
        model = _create(model_name, pretrained=False)
        # Hash the random init so predict can check it rebuilt the same network.
        w = Weights("none", _sha256_tensors(model.state_dict()))
    elif weights == "auto":
        bundled = bundled_weights_file(model_name)
        model = _create(model_name, pretrained=False)
        if bundled is not None:
            sd = torch.load(str(bundled), map_location="cpu", weights_only=True)
            _apply_state_dict(model, sd, f"bundled package {BUNDLED_WEIGHTS[model_name]}")
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
        model = _create(model_name, pretrained=False)
        _apply_state_dict(model, _read_state_dict(path), str(path))
        w = Weights(str(path.resolve()), file_sha256(path))
    model.eval()
    return Backbone(model=model, name=model_name, weights=w, data_config=data_config_for(model))


def _load_timm_pretrained(model_name: str) -> nn.Module:
    # Cache first, so an offline machine with cached weights never waits on the network.
    prev = os.environ.get("HF_HUB_OFFLINE")
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return _create(model_name, pretrained=True)
    except ModelError:
        raise
    except Exception:
        pass
    finally:
        if prev is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = prev
    try:
        return _create(model_name, pretrained=True)
    except ModelError:
        raise
    except Exception as e:
        offline = ", ".join(sorted(BUNDLED_WEIGHTS))
        raise WeightsError(
            f"pretrained weights for '{model_name}' are not in the local cache and could not be "
            f"downloaded ({type(e).__name__}). Offline options: --model one of {offline} "
            "(bundled weights), --weights FILE (.safetensors/.pth), or --weights none "
            "(random init, for testing)"
        ) from None


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


# ----------------------------------------------------------------------------- layers


def _tracked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Candidate cut points: top-level children and, inside Sequential/ModuleList
    containers, their children (recursively), e.g. blocks, blocks.3, blocks.3.1."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            out.append((full, child))
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                visit(full + ".", child)

    visit("", model)
    return out


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return out.numel() // out.shape[0] * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() // out.shape[0] * module.in_features
    return 0


def list_layers(model: nn.Module, input_size: int | None = None) -> list[LayerInfo]:
    """Every place the network can be cut, in the order their outputs are computed,
    with output shape, reduction, cumulative parameters and GFLOPs for one image."""
    cfg = data_config_for(model)
    size = input_size or cfg["input_size"][1]
    candidates = dict(_tracked_modules(model))
    stage_of = {fi["module"]: i for i, fi in enumerate(getattr(model, "feature_info", []) or [])}
    events: list[tuple[str, tuple[int, ...], int, float]] = []
    seen_params: set[int] = set()
    counted = {"params": 0, "macs": 0}

    def leaf_hook(module, inp, out):
        for p in module.parameters(recurse=False):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                counted["params"] += p.numel()
        if isinstance(out, torch.Tensor):
            counted["macs"] += _macs(module, inp, out)

    def cand_hook(name):
        def hook(module, inp, out):
            # Parameters of a container count once all its children ran.
            for p in module.parameters():
                if id(p) not in seen_params:
                    seen_params.add(id(p))
                    counted["params"] += p.numel()
            if isinstance(out, torch.Tensor):
                events.append(
                    (name, tuple(out.shape[1:]), counted["params"], 2 * counted["macs"] / 1e9)
                )

        return hook

    handles = [m.register_forward_hook(leaf_hook) for m in model.modules()]
    handles += [m.register_forward_hook(cand_hook(n)) for n, m in candidates.items()]
    try:
        with torch.inference_mode():
            model.eval()
            model.forward_features(torch.zeros(1, 3, size, size))
    except Exception as e:
        raise ModelError(f"cannot run {type(model).__name__} at input size {size}: {e}") from None
    finally:
        for h in handles:
            h.remove()
    layers: list[LayerInfo] = []
    done: set[str] = set()
    for name, shape, params, gflops in events:
        if name in done:  # a module called twice (shared) is listed at its first use
            continue
        done.add(name)
        reduction = size // shape[-1] if len(shape) == 3 and shape[-1] else None
        layers.append(
            LayerInfo(
                name=name,
                type=type(candidates[name]).__name__,
                shape=shape,
                reduction=reduction,
                params=params,
                gflops=round(gflops, 4),
                stage=stage_of.get(name),
            )
        )
    return layers


def resolve_layers(model: nn.Module, requested: Sequence[str] | str | None) -> tuple[str, ...]:
    """Turn user input (names, stage indices like -1, "final") into module names."""
    if requested is None:
        return (FINAL_LAYER,)
    if isinstance(requested, str):
        requested = [p.strip() for p in requested.split(",") if p.strip()]
    if not requested:
        raise UsageError("--layer is empty; give a layer name from `tlearn layers MODEL`")
    names = {n for n, _ in _tracked_modules(model)}
    stages = [fi["module"] for fi in (getattr(model, "feature_info", []) or [])]
    out: list[str] = []
    for item in requested:
        if item == FINAL_LAYER:
            out.append(item)
            continue
        try:
            idx = int(item)
        except ValueError:
            idx = None
        if idx is not None:
            if not stages or not -len(stages) <= idx < len(stages):
                raise UsageError(
                    f"--layer {item}: stage index out of range; this model has {len(stages)} "
                    f"feature stages (0..{len(stages) - 1} or -1..-{len(stages)})"
                )
            out.append(stages[idx])
        elif item in names:
            out.append(item)
        else:
            close = difflib.get_close_matches(item, sorted(names), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(
                f"unknown layer '{item}'{hint} (list them with: tlearn layers "
                f"{getattr(model, 'pretrained_cfg', {}).get('architecture', 'MODEL')})"
            )
    if len(set(out)) != len(out):
        raise UsageError(f"--layer lists the same layer twice: {','.join(requested)}")
    return tuple(out)


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


class FeatureNetwork(nn.Module):
    """Cut network + pooling: images in, one feature vector per image out. With several
    layers the pooled vectors are concatenated (mid-level texture + high-level shape)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str):
        super().__init__()
        if pool not in POOLS:
            raise UsageError(f"unknown --pool '{pool}'; allowed: {', '.join(POOLS)}")
        self.cut = CutNetwork(model, layers)
        self.pool = pool
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.cut(x)
        vecs = []
        for layer, fmap in zip(self.cut.layers, maps, strict=True):
            if layer == FINAL_LAYER and self.pool == "avg":
                # The model's own pooling (e.g. token pooling for ViTs, avg for CNNs).
                vecs.append(self.model.forward_head(fmap, pre_logits=True))
            else:
                vecs.append(pool_features(fmap, self.pool))
        return torch.cat(vecs, dim=1) if len(vecs) > 1 else vecs[0]


def feature_network(
    backbone: Backbone, layers, pool: str = "avg"
) -> tuple[FeatureNetwork, CutSpec]:
    names = resolve_layers(backbone.model, layers)
    net = FeatureNetwork(backbone.model, names, pool).eval()
    spec = CutSpec(
        model=backbone.name,
        weights_source=backbone.weights.source,
        weights_sha256=backbone.weights.sha256,
        layers=names,
        pool=pool,
    )
    return net, spec


def feature_dim(net: FeatureNetwork, data_config: dict) -> int:
    size = data_config["input_size"]
    with torch.inference_mode():
        return int(net(torch.zeros(1, *size)).shape[1])


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
