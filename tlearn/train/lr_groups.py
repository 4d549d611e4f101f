"""`--lr-groups "conv_stem,bn1,blocks.0-1=0;blocks.2-4=1e-4;head=1e-3"`: explicit learning
rates per group of modules, 0 meaning frozen. Modules not named join the group of the
nearest module before them; the head keeps --lr unless a group names it."""

from __future__ import annotations

import difflib
import re

from tlearn.core.errors import UsageError
from tlearn.train.plan import HEAD, GroupRow, compact_modules


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


def _owners(net, specs: list[tuple[str, list[str], float]]) -> dict[str, int]:
    """Module name -> index of the group that names it (checked: known, named once)."""
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
    return owner


def _assign(used: list[str], owner: dict[str, int]) -> dict[str, int]:
    """Parameter -> group index: the longest named module containing it, else (backbone
    parameters) the group of the parameter before it."""

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
    return assigned


def plan_lr_groups(net, used: list[str], text: str, head_lr: float) -> list[GroupRow]:
    """The table rows of an --lr-groups text over the parameters the network uses."""
    specs = parse_lr_groups(text)
    assigned = _assign(used, _owners(net, specs))
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
