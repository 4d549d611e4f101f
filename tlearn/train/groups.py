"""Freezing and learning rates per parameter group: the plan of a run.

Three ways to say what trains and how fast (all give a list of `GroupRow`s, printed as the
parameter-group table and turned into the optimiser's param groups one to one):

- `--freeze all|none` / `--freeze-to LAYER`: everything computed up to and including LAYER
  is frozen (no gradient, no optimiser state, BatchNorm in eval mode);
- `--layer-decay D`: timm's layer-wise decay over the model's coarse group matcher
  (stem, stages/blocks, ...): the head trains at --lr and each group below it at D times
  the rate of the group above;
- `--lr-groups "conv_stem,bn1,blocks.0-1=0;blocks.2-4=1e-4;head=1e-3"`: explicit rates,
  0 meaning frozen (train.lr_groups).

Only parameters the network actually uses (up to the cut) are listed; the rest of the
backbone is never computed and never trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tlearn.backbone.layers import resolve_layers
from tlearn.backbone.transfer import execution_order
from tlearn.core.errors import UsageError
from tlearn.core.spec import FINAL_LAYER
from tlearn.train.lr_groups import plan_lr_groups
from tlearn.train.plan import (
    HEAD,
    GroupPlan,
    GroupRow,
    compact_modules,
    module_of,
    used_parameters,
)

try:  # a private timm module, which may move between timm versions
    from timm.models._manipulate import group_with_matcher
except ImportError:
    group_with_matcher = None

DEFAULT_LAYER_DECAY = 0.5
FREEZE_CHOICES = ("all", "none")


def _stage_groups(model: nn.Module, backbone_params: list[str]) -> list[list[str]]:
    """Backbone parameters (model.*) grouped by the model's coarse group matcher (timm's
    layer-decay grouping), bottom to top. Without a matcher: one group per top-level child."""
    rel = [p[len("model.") :] for p in backbone_params]
    ids: dict[str, int] | None = None
    if hasattr(model, "group_matcher") and group_with_matcher is not None:
        try:
            ids = group_with_matcher(
                [(n, None) for n in rel], model.group_matcher(coarse=True), reverse=True
            )
        except Exception:
            ids = None
    if ids is None:
        tops = list(dict.fromkeys(n.split(".")[0] for n in rel))
        ids = {n: tops.index(n.split(".")[0]) for n in rel}
    groups: dict[int, list[str]] = {}
    for n in rel:
        groups.setdefault(ids[n], []).append("model." + n)
    # Order by first use so "bottom" really is the input side.
    pos = {p: i for i, p in enumerate(backbone_params)}
    return sorted(groups.values(), key=lambda g: min(pos[p] for p in g))


def _completion_index(order: Sequence[str], layer: str) -> int | None:
    name = f"model.{layer}"
    hits = [i for i, m in enumerate(order) if m == name or m.startswith(name + ".")]
    return max(hits) if hits else None


# ----------------------------------------------------------------------------- freeze-to


def auto_freeze_to(net, full_order: Sequence[str], used: Sequence[str]) -> str | None:
    """A middle layer: the deepest feature stage before the last one (the stride-16 stage
    of a CNN) that still leaves something to train before the cut."""
    stages = [fi["module"] for fi in (getattr(net.model, "feature_info", []) or [])]
    for name in reversed(stages[:-1]):
        frozen = _frozen_up_to(full_order, name, used)
        n_backbone = len([p for p in used if p.startswith("model.")])
        if frozen is not None and 0 < len(frozen) < n_backbone:
            return name
    return None


def _frozen_up_to(full_order: Sequence[str], layer: str, used: Sequence[str]) -> set[str] | None:
    end = _completion_index(full_order, layer)
    if end is None:
        return None
    done = set(full_order[: end + 1])
    return {p for p in used if p.startswith("model.") and module_of(p) in done}


def _freeze_to(
    net, freeze_to: str, full_order: Sequence[str], used: Sequence[str], notes: list[str]
) -> tuple[str | None, set[str] | None]:
    """(the resolved --freeze-to layer, the backbone parameters it freezes); (None, None)
    when "auto" finds no middle stage."""
    backbone = [p for p in used if p.startswith("model.")]
    if freeze_to == "auto":
        resolved_to = auto_freeze_to(net, full_order, used)
        if resolved_to is None:
            notes.append("no middle stage before the cut to freeze: the whole backbone trains")
            return None, None
    else:
        resolved_to = resolve_layers(net.model, [freeze_to], "--freeze-to")[0]
        if resolved_to == FINAL_LAYER:
            raise UsageError("--freeze-to final freezes everything; use --freeze all")
    got = _frozen_up_to(full_order, resolved_to, used)
    if got is None:
        raise UsageError(
            f"--freeze-to {resolved_to} is not computed before the cut "
            f"--layer {','.join(net.layers)}; pick an earlier layer or --freeze all"
        )
    if len(got) == len(backbone):
        raise UsageError(
            f"--freeze-to {resolved_to} freezes every layer up to the cut "
            f"--layer {','.join(net.layers)}; use --freeze all, or an earlier layer"
        )
    return resolved_to, got


# ----------------------------------------------------------------------------- plan


def _check_arguments(freeze, freeze_to, layer_decay, lr_groups, lr: float) -> None:
    if not lr > 0:
        raise UsageError(f"--lr {lr}: must be positive, e.g. 1e-3")
    if freeze is not None and freeze not in FREEZE_CHOICES:
        raise UsageError(
            f"--freeze '{freeze}': allowed: all, none (or --freeze-to LAYER to freeze up to LAYER)"
        )
    if lr_groups is not None and (freeze or freeze_to or layer_decay is not None):
        raise UsageError(
            "--lr-groups sets freezing and rates itself; drop --freeze, --freeze-to and "
            "--layer-decay"
        )
    if freeze is not None and freeze_to is not None:
        raise UsageError("use either --freeze all|none or --freeze-to LAYER, not both")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise UsageError(f"--layer-decay {layer_decay}: must be in (0, 1], e.g. 0.5 (1 = no decay)")
    if freeze == "all" and layer_decay is not None:
        raise UsageError(
            "--layer-decay needs a trainable backbone; add --freeze-to LAYER or --freeze none"
        )


def plan_groups(
    net,
    *,
    lr: float,
    freeze: str | None = None,
    freeze_to: str | None = None,
    layer_decay: float | None = None,
    lr_groups: str | None = None,
) -> GroupPlan:
    """Decide what trains and at which rate. See the module docstring for the options."""
    _check_arguments(freeze, freeze_to, layer_decay, lr_groups, lr)
    full_order = execution_order(net)
    used = used_parameters(net, full_order)
    sizes = dict(net.named_parameters())
    count = lambda ps: sum(sizes[p].numel() for p in ps)  # noqa: E731
    backbone = [p for p in used if p.startswith("model.")]
    head = [p for p in used if p.startswith(HEAD + ".")]
    notes: list[str] = []

    if lr_groups is not None:
        return GroupPlan(rows=plan_lr_groups(net, used, lr_groups, lr), notes=notes)

    if freeze is None and freeze_to is None:
        freeze_to = "auto" if layer_decay is not None else None
        freeze = None if layer_decay is not None else "all"
    frozen: set[str] = set()
    resolved_to = None
    if freeze == "all":
        frozen = set(backbone)
    elif freeze_to is not None:
        resolved_to, got = _freeze_to(net, freeze_to, full_order, used, notes)
        frozen = got if got is not None else frozen
    decay = layer_decay
    if decay is None and len(frozen) < len(backbone):
        decay = DEFAULT_LAYER_DECAY

    rows: list[GroupRow] = []
    stages = _stage_groups(net.model, backbone) if backbone else []
    n = len(stages)
    for i, group in enumerate(stages):
        scale = (decay or 1.0) ** (n - i)
        for is_frozen in (True, False):
            part = [p for p in group if (p in frozen) == is_frozen]
            if not part:
                continue
            mods = compact_modules(net.model, part)
            rows.append(
                GroupRow(
                    name=",".join(mods),
                    modules=mods,
                    params=part,
                    n_params=count(part),
                    lr=None if is_frozen else lr * scale,
                    frozen=is_frozen,
                )
            )
    rows = _merge_frozen(net.model, rows)
    rows.append(GroupRow(HEAD, [HEAD], head, count(head), lr, False))
    return GroupPlan(
        rows=rows,
        freeze_to=resolved_to,
        layer_decay=decay if len(frozen) < len(backbone) else None,
        notes=notes,
    )


def _merge_frozen(model: nn.Module, rows: list[GroupRow]) -> list[GroupRow]:
    """Adjacent frozen rows become one row (the table stays short)."""
    out: list[GroupRow] = []
    for r in rows:
        if out and r.frozen and out[-1].frozen:
            params = out[-1].params + r.params
            mods = compact_modules(model, params)
            out[-1] = GroupRow(
                ",".join(mods), mods, params, out[-1].n_params + r.n_params, None, True
            )
        else:
            out.append(r)
    return out
