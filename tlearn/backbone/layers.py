"""Where a network can be cut: every candidate layer with its output shape, stride,
parameters and GFLOPs (the lecture's arithmetic, measured), user input resolved to
layer names, and the cut points a sweep tries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tlearn.backbone.models import data_config_for
from tlearn.core.errors import ModelError
from tlearn.core.layers import LayerNames, resolve_layer_names
from tlearn.core.spec import FINAL_LAYER


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # per image, without batch: (C, H, W) or (N, C) for tokens
    reduction: int | None
    params: int  # cumulative parameters computed up to and including this layer
    gflops: float  # cumulative GFLOPs (2 x multiply-adds of convs and linears)
    stage: int | None = None  # index into timm's feature_info, when this is a stage output


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


def layer_names(model: nn.Module, name: str | None = None) -> LayerNames:
    """The model's cut points (what --layer may name) and its feature stages; `name`: the
    timm name it was created with (default: its architecture)."""
    arch = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "MODEL")
    stages = [fi["module"] for fi in (getattr(model, "feature_info", []) or [])]
    return LayerNames(arch, tuple(n for n, _ in _tracked_modules(model)), tuple(stages))


def resolve_layers(
    model: nn.Module, requested: Sequence[str] | str | None, option: str = "--layer"
) -> tuple[str, ...]:
    """Turn user input (names, stage indices like -1, "final") into module names."""
    return resolve_layer_names(requested, layer_names(model), option)


LAYER_SETS = ("stages", "all")
MIN_BLOCKS = 6  # with fewer blocks than this, `all` also adds the sub-blocks inside stages


# ----------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """A cut point with what it costs: output shape per image, cumulative parameters and
    GFLOPs for one image up to and including it, and its timm feature stage if any."""

    name: str
    shape: tuple[int, ...]
    params: int
    gflops: float
    stage: int | None = None


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def candidate_layers(
    model, which: str | Sequence[str] = "stages", infos: list[LayerInfo] | None = None
) -> list[Candidate]:
    """Cut points to sweep, in the order the network computes them, ending with `final`.

    stages: timm's feature_info stages (where the resolution drops) + final.
    all:    every block at the stages' level (blocks.N, layerN, ...), so also the blocks
            between stages; if there are fewer than MIN_BLOCKS, also the sub-blocks of
            multi-block stages.
    A list (or "a,b,c"): exactly those layers (names, stage indices or final).
    """
    infos = infos if infos is not None else list_layers(model)
    order = [li.name for li in infos]
    by_name = {li.name: li for li in infos}
    stages = [fi["module"] for fi in (getattr(model, "feature_info", None) or [])]
    stages = [s for s in stages if s in by_name]
    if isinstance(which, str) and which.strip().lower() in LAYER_SETS:
        kind = which.strip().lower()
        wanted = set(stages)
        if kind == "all":
            parents = {_parent(s) for s in stages} if stages else {""}
            level = {n for n in order if _parent(n) in parents}
            wanted |= level
            if len(level) < MIN_BLOCKS:
                for s in stages:
                    children = [n for n in order if _parent(n) == s]
                    if len(children) > 1:
                        wanted |= set(children)
        names = [n for n in order if n in wanted] + [FINAL_LAYER]
    else:
        names = list(resolve_layers(model, which))
        rank = {n: i for i, n in enumerate(order + [FINAL_LAYER])}
        names.sort(key=lambda n: rank[n])
    last = infos[-1] if infos else None
    out = []
    for n in names:
        li = by_name.get(n)
        if n == FINAL_LAYER or li is None:
            # The model's own pooled features, computed after the whole feature extractor.
            shape = last.shape if last else ()
            params, gflops, stage = (last.params, last.gflops, None) if last else (0, 0.0, None)
        else:
            shape, params, gflops, stage = li.shape, li.params, li.gflops, li.stage
        out.append(Candidate(n, tuple(shape), params, gflops, stage))
    return out


def overview_layers(model, infos: list[LayerInfo]) -> list[LayerInfo]:
    """The stem, every block at the stages' level, and the last layer: one row per block
    for a picture of the network (sub-blocks would crowd it)."""
    keep = {c.name for c in candidate_layers(model, "all", infos)}
    last = len(infos) - 1
    return [li for i, li in enumerate(infos) if li.name in keep or i in (0, last)]
