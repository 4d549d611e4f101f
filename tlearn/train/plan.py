"""The parameter-group plan: which parameters train and at which rate, as the rows of the
table the CLI prints (one learning rate in the optimiser each), and the short module
names those rows show. How a plan is decided: train.groups and train.lr_groups."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

HEAD = "head"


@dataclass
class GroupRow:
    """One row of the parameter-group table and one learning rate in the optimiser."""

    name: str
    modules: list[str]  # compact module names (backbone names without the "model." prefix)
    params: list[str]  # parameter names in the network (model.* / head.*)
    n_params: int | None  # None: a frozen backbone that was never loaded (warm run)
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


def module_of(param: str) -> str:
    """The module a parameter name belongs to ("" for the root's own parameters)."""
    return param.rsplit(".", 1)[0] if "." in param else ""


def used_parameters(net: nn.Module, order: Sequence[str]) -> list[str]:
    """Parameter names the network uses, backbone ones in execution order, then the head."""
    rank = {m: i for i, m in enumerate(order)}
    backbone = [
        (rank[module_of(n)], i, n)
        for i, (n, _) in enumerate(net.named_parameters())
        if n.startswith("model.") and module_of(n) in rank
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
            mod = module_of(rel)
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
    return _merge_ranges(out) + ([HEAD] if HEAD in units else [])


def _merge_ranges(names: list[str]) -> list[str]:
    """Runs of numbered siblings as one range: blocks.0, blocks.1, blocks.2 -> blocks.0-2."""
    merged: list[str] = []
    for u in names:
        m = re.fullmatch(r"(.*)\.(\d+)", u)
        if merged and m:
            prev = re.fullmatch(r"(.*)\.(\d+)(?:-(\d+))?", merged[-1])
            if prev and prev.group(1) == m.group(1):
                hi = int(prev.group(3) or prev.group(2))
                if int(m.group(2)) == hi + 1:
                    merged[-1] = f"{m.group(1)}.{prev.group(2)}-{m.group(2)}"
                    continue
        merged.append(u)
    return merged
