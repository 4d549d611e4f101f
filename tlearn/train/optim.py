"""The optimiser of a run and what it touches: one param group per table row (with and
without weight decay), requires_grad per the plan, frozen parts in eval mode, and mixed
precision (autocast, and the gradient scaler for float16) with the optimiser step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tlearn.core.errors import UsageError
from tlearn.train.plan import HEAD, GroupPlan


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


# ----------------------------------------------------------------------------- precision


@dataclass
class Amp:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with a gradient
    scaler); plain float32 elsewhere."""

    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None


def amp_for(device: torch.device) -> Amp:
    if device.type != "cuda":
        return Amp(contextlib.nullcontext)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Amp(lambda: torch.autocast("cuda", dtype=dtype), scaler)


def optimizer_step(optimizer: torch.optim.Optimizer, amp: Amp, loss: torch.Tensor) -> None:
    """Backward and one optimiser step (through the AMP gradient scaler for float16)."""
    optimizer.zero_grad(set_to_none=True)
    if amp.scaler is not None:
        amp.scaler.scale(loss).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
    else:
        loss.backward()
        optimizer.step()
