"""Freezing and learning rates per parameter group.

Three ways to say what trains and how fast (all give a list of `GroupRow`s, printed as the
parameter-group table and turned into the optimiser's param groups one to one):

- `--freeze all|none` / `--freeze-to LAYER`: everything computed up to and including LAYER
  is frozen (no gradient, no optimiser state, BatchNorm in eval mode);
- `--layer-decay D`: timm's layer-wise decay over the model's coarse group matcher
  (stem, stages/blocks, ...): the head trains at --lr and each group below it at D times
  the rate of the group above;
- `--lr-groups "conv_stem,bn1,blocks.0-1=0;blocks.2-4=1e-4;head=1e-3"`: explicit rates,
  0 meaning frozen. Modules not named join the group of the nearest module before them.

Only parameters the network actually uses (up to the cut) are listed; the rest of the
backbone is never computed and never trained.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tlearn.backbone.layers import resolve_layers
from tlearn.core.errors import UsageError
from tlearn.core.spec import FINAL_LAYER

DEFAULT_LAYER_DECAY = 0.5
FREEZE_CHOICES = ("all", "none")
HEAD = "head"


@dataclass
class GroupRow:
    """One row of the parameter-group table and one learning rate in the optimiser."""

    name: str
    modules: list[str]  # compact module names (backbone names without the "model." prefix)
    params: list[str]  # parameter names in the network (model.* / head.*)
    n_params: int
    lr: float | None  # None when frozen
    frozen: bool

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modules": self.modules,
            "n_params": self.n_params,
            "lr": self.lr,
            "frozen": self.frozen,
        }


@dataclass
class GroupPlan:
    rows: list[GroupRow]
    freeze_to: str | None = None  # the resolved --freeze-to layer, if any
    layer_decay: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def frozen_params(self) -> set[str]:
        return {p for r in self.rows if r.frozen for p in r.params}

    @property
    def trainable_params(self) -> set[str]:
        return {p for r in self.rows if not r.frozen for p in r.params}

    @property
    def backbone_trains(self) -> bool:
        return any(p.startswith("model.") for p in self.trainable_params)


# ----------------------------------------------------------------------------- helpers


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def used_parameters(net: nn.Module, order: Sequence[str]) -> list[str]:
    """Parameter names the network uses, backbone ones in execution order, then the head."""
    rank = {m: i for i, m in enumerate(order)}
    backbone = [
        (rank[_module_of(n)], i, n)
        for i, (n, _) in enumerate(net.named_parameters())
        if n.startswith("model.") and _module_of(n) in rank
    ]
    head = [n for n, _ in net.named_parameters() if n.startswith(HEAD + ".")]
    return [n for _, _, n in sorted(backbone)] + head


def _unit(model: nn.Module, rel: str) -> str:
    """The display unit of a module path: descend through containers only."""
    parts = rel.split(".")
    node, out = model, []
    for p in parts:
        out.append(p)
        try:
            node = node.get_submodule(p)
        except AttributeError:
            break
        if not isinstance(node, (nn.Sequential, nn.ModuleList)):
            break
    unit = ".".join(out)
    # A backbone module named like the new head (e.g. ConvNeXt's head.norm) keeps its
    # full name, so "head" always means the new head.
    return rel if unit == HEAD else unit


def _is_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def compact_modules(model: nn.Module, params: Sequence[str]) -> list[str]:
    """Short module names for a set of parameters: whole containers by their name and runs
    of numbered siblings as ranges, e.g. conv_stem, bn1, blocks.0-4."""
    units: list[str] = []
    for p in params:
        if p.startswith(HEAD + "."):
            u = HEAD
        else:
            rel = p[len("model.") :]
            mod = _module_of(rel)
            u = _unit(model, mod) if mod else rel  # a parameter of the model itself
        if u not in units:
            units.append(u)
    present = set(units)

    def covered(path: str) -> bool:
        if path in present:
            return True
        try:
            m = model.get_submodule(path)
        except AttributeError:
            return False
        kids = list(m.named_children())
        if not isinstance(m, (nn.Sequential, nn.ModuleList)) or not kids:
            return False
        return all(covered(f"{path}.{k}") for k, _ in kids)

    out_tree: list[str] = []

    def emit(path: str) -> None:
        if covered(path):
            out_tree.append(path)
            return
        try:
            m = model.get_submodule(path)
        except AttributeError:
            return
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            for k, _ in m.named_children():
                emit(f"{path}.{k}")

    # Parameters of the model itself (e.g. position embeddings) come first.
    out: list[str] = [u for u in units if u != HEAD and not _is_module(model, u)]
    for name, _ in model.named_children():
        emit(name)
    out += out_tree
    first = {u: i for i, u in enumerate(units)}
    out.sort(key=lambda u: min(i for x, i in first.items() if x == u or x.startswith(u + ".")))
    merged: list[str] = []
    for u in out:
        m = re.fullmatch(r"(.*)\.(\d+)", u)
        if merged and m:
            prev = re.fullmatch(r"(.*)\.(\d+)(?:-(\d+))?", merged[-1])
            if prev and prev.group(1) == m.group(1):
                hi = int(prev.group(3) or prev.group(2))
                if int(m.group(2)) == hi + 1:
                    merged[-1] = f"{m.group(1)}.{prev.group(2)}-{m.group(2)}"
                    continue
        merged.append(u)
    if HEAD in units:
        merged.append(HEAD)
    return merged


def _stage_groups(model: nn.Module, backbone_params: list[str]) -> list[list[str]]:
    """Backbone parameters (model.*) grouped by the model's coarse group matcher (timm's
    layer-decay grouping), bottom to top. Without a matcher: one group per top-level child."""
    rel = [p[len("model.") :] for p in backbone_params]
    ids: dict[str, int] | None = None
    if hasattr(model, "group_matcher"):
        try:
            from timm.models._manipulate import group_with_matcher

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
    return {p for p in used if p.startswith("model.") and _module_of(p) in done}


# ----------------------------------------------------------------------------- lr-groups


def _expand(item: str) -> list[str]:
    m = re.fullmatch(r"(.*?)(\d+)-(\d+)", item)
    if not m:
        return [item]
    lo, hi = int(m.group(2)), int(m.group(3))
    if hi < lo:
        raise UsageError(f"--lr-groups: range '{item}' runs backwards; write it low-high")
    return [f"{m.group(1)}{i}" for i in range(lo, hi + 1)]


def parse_lr_groups(text: str) -> list[tuple[str, list[str], float]]:
    """'a,b.0-1=0;c=1e-4;head=1e-3' -> [(label, [modules], lr), ...]."""
    specs = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        if part.count("=") != 1:
            raise UsageError(
                f"--lr-groups: '{part}' is not MODULES=LR; write e.g. "
                "'conv_stem,bn1,blocks.0-1=0;blocks.2-6=1e-4;head=1e-3'"
            )
        lhs, rhs = (s.strip() for s in part.split("="))
        try:
            lr = float(rhs)
        except ValueError:
            raise UsageError(f"--lr-groups: '{rhs}' in '{part}' is not a number") from None
        if not lr >= 0 or lr == float("inf"):
            raise UsageError(f"--lr-groups: rate {rhs} in '{part}' must be 0 (frozen) or positive")
        items = [item.strip() for item in lhs.split(",") if item.strip()]
        names = [n for item in items for n in _expand(item)]
        if not names:
            raise UsageError(f"--lr-groups: '{part}' names no modules")
        specs.append((",".join(items), names, lr))
    if not specs:
        raise UsageError(
            "--lr-groups is empty; write e.g. 'blocks.0-4=0;blocks.5-6=1e-4;head=1e-3'"
        )
    return specs


def _plan_lr_groups(net, used: list[str], text: str, head_lr: float) -> list[GroupRow]:
    specs = parse_lr_groups(text)
    known = {n for n, _ in net.model.named_modules() if n} | {
        n for n, _ in net.model.named_parameters()
    }
    owner: dict[str, int] = {}
    for gi, (_, names, _) in enumerate(specs):
        for n in names:
            if n != HEAD and n not in known:
                close = difflib.get_close_matches(n, sorted(known), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UsageError(
                    f"--lr-groups: unknown module '{n}'{hint} (see: tlearn layers MODEL)"
                )
            if n in owner:
                raise UsageError(f"--lr-groups: '{n}' is in two groups; list each module once")
            owner[n] = gi

    def group_of(param: str) -> int | None:
        if param.startswith(HEAD + "."):
            return owner.get(HEAD)
        rel = param[len("model.") :]
        best, best_len = None, -1
        for n, gi in owner.items():
            if n != HEAD and (rel == n or rel.startswith(n + ".")) and len(n) > best_len:
                best, best_len = gi, len(n)
        return best

    assigned: dict[str, int] = {}
    last: int | None = None
    for p in used:
        g = group_of(p)
        if g is None and p.startswith("model."):
            if last is None:
                raise UsageError(
                    f"--lr-groups does not cover {p[len('model.') :]}, which runs before every "
                    "module it names; add the first modules of the network (e.g. the stem) to "
                    "a group"
                )
            g = last
        if g is not None:
            assigned[p] = g
            if p.startswith("model."):
                last = g
    sizes = dict(net.named_parameters())
    rows = []
    for gi, (label, _, lr) in enumerate(specs):
        params = [p for p in used if assigned.get(p) == gi]
        if not params:
            raise UsageError(
                f"--lr-groups: group '{label}' has no parameters the network uses (is it "
                "after the cut --layer?)"
            )
        rows.append(
            GroupRow(
                name=label,
                modules=compact_modules(net.model, params),
                params=params,
                n_params=sum(sizes[p].numel() for p in params),
                lr=None if lr == 0 else lr,
                frozen=lr == 0,
            )
        )
    head = [p for p in used if p.startswith(HEAD + ".") and p not in assigned]
    if head:
        rows.append(
            GroupRow(HEAD, [HEAD], head, sum(sizes[p].numel() for p in head), head_lr, False)
        )
    return rows


# ----------------------------------------------------------------------------- plan


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
    from tlearn.backbone.transfer import execution_order

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

    full_order = execution_order(net)
    used = used_parameters(net, full_order)
    sizes = dict(net.named_parameters())
    count = lambda ps: sum(sizes[p].numel() for p in ps)  # noqa: E731
    backbone = [p for p in used if p.startswith("model.")]
    head = [p for p in used if p.startswith(HEAD + ".")]
    notes: list[str] = []

    if lr_groups is not None:
        return GroupPlan(rows=_plan_lr_groups(net, used, lr_groups, lr), notes=notes)

    if freeze is None and freeze_to is None:
        freeze_to = "auto" if layer_decay is not None else None
        freeze = None if layer_decay is not None else "all"
    frozen: set[str] = set()
    resolved_to = None
    if freeze == "all":
        frozen = set(backbone)
    elif freeze_to is not None:
        if freeze_to == "auto":
            resolved_to = auto_freeze_to(net, full_order, used)
            if resolved_to is None:
                notes.append("no middle stage before the cut to freeze: the whole backbone trains")
        else:
            resolved_to = resolve_layers(net.model, [freeze_to])[0]
            if resolved_to == FINAL_LAYER:
                raise UsageError("--freeze-to final freezes everything; use --freeze all")
        if resolved_to is not None:
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
            frozen = got
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


# ----------------------------------------------------------------------------- optimiser


def _no_decay(net, name: str, p: torch.Tensor) -> bool:
    skip = set()
    if hasattr(net.model, "no_weight_decay"):
        try:
            skip = {f"model.{n}" for n in net.model.no_weight_decay()}
        except Exception:
            skip = set()
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def build_optimizer(
    net,
    plan: GroupPlan,
    *,
    optimizer: str = "adamw",
    weight_decay: float = 0.01,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """One optimiser param group per (table row, with/without weight decay); frozen rows
    are left out entirely. Each group carries its row's `name` and `base_lr`."""
    params = dict(net.named_parameters())
    groups = []
    for row in plan.rows:
        if row.frozen:
            continue
        decay = [params[p] for p in row.params if not _no_decay(net, p, params[p])]
        no_decay = [params[p] for p in row.params if _no_decay(net, p, params[p])]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append(
                    {
                        "params": ps,
                        "lr": row.lr,
                        "base_lr": row.lr,
                        "weight_decay": wd,
                        "name": row.name,
                    }
                )
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=plan.rows[-1].lr)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=plan.rows[-1].lr, momentum=momentum)
    raise UsageError(f"unknown --optimizer '{optimizer}'; allowed: adamw, sgd")


def apply_freeze(net, plan: GroupPlan, head_only: bool = False) -> None:
    """requires_grad per the plan (head_only: everything but the head frozen, for the
    --freeze-epochs warm-up). Parameters the network does not use are frozen too."""
    trainable = plan.trainable_params
    for name, p in net.named_parameters():
        on = name in trainable and (not head_only or name.startswith(HEAD + "."))
        p.requires_grad_(on)


def frozen_modules(net) -> list[nn.Module]:
    """Backbone modules all of whose parameters are frozen (the outermost such modules):
    they run in eval mode during training, so their BatchNorm statistics stay fixed."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            out.append(m)
            return
        for child in m.children():
            visit(child)

    visit(net.model)
    return out


def set_train_mode(net, bn: str = "frozen") -> None:
    """net.train(), then frozen parts back to eval mode (unless --bn train)."""
    net.train()
    if bn == "frozen":
        for m in frozen_modules(net):
            m.eval()
