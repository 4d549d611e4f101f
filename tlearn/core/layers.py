"""Turning what a user types for --layer / --freeze-to (names, stage indices like -1,
`final`) into module names, from a model's list of cut points alone: the backbone
package resolves with the list it reads off the network, and runs that have not loaded a
network yet check with a remembered or bundled list (fail fast, before torch)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from tlearn.core.errors import UsageError
from tlearn.core.spec import FINAL_LAYER


@dataclass(frozen=True)
class LayerNames:
    """Where a model can be cut: every candidate module name, and timm's feature stages."""

    model: str
    names: tuple[str, ...]
    stages: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"model": self.model, "names": list(self.names), "stages": list(self.stages)}

    @classmethod
    def from_dict(cls, d: dict) -> LayerNames:
        names, stages = d["names"], d["stages"]
        if not all(isinstance(n, str) for n in [*names, *stages]) or not isinstance(
            d["model"], str
        ):
            raise ValueError("layer names must be strings")
        return cls(d["model"], tuple(names), tuple(stages))


def split_request(requested: Sequence[str] | str | None) -> list[str] | None:
    """ "a, b" -> ["a", "b"]; None stays None (the default cut)."""
    if requested is None or not isinstance(requested, str):
        return None if requested is None else list(requested)
    return [p.strip() for p in requested.split(",") if p.strip()]


def resolve_layer_names(
    requested: Sequence[str] | str | None, known: LayerNames, option: str = "--layer"
) -> tuple[str, ...]:
    """Module names for user input (names, stage indices like -1, "final")."""
    items = split_request(requested)
    if items is None:
        return (FINAL_LAYER,)
    if not items:
        raise UsageError(f"{option} is empty; give a layer name from `tlearn layers MODEL`")
    names, stages = set(known.names), list(known.stages)
    out: list[str] = []
    for item in items:
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
                    f"{option} {item}: stage index out of range; this model has {len(stages)} "
                    f"feature stages (0..{len(stages) - 1} or -1..-{len(stages)})"
                )
            out.append(stages[idx])
        elif item in names:
            out.append(item)
        else:
            close = difflib.get_close_matches(item, sorted(names), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(
                f"unknown layer '{item}' for {option}{hint} (list them with: tlearn layers "
                f"{known.model})"
            )
    if len(set(out)) != len(out):
        raise UsageError(f"{option} lists the same layer twice: {','.join(items)}")
    return tuple(out)
