"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder MODEL_DIR/checkpoint/ holding
  state.json            epoch, step, settings, history, early-stopping state, scaler state
  weights.safetensors   the tensors training can change (trainable parameters, their
                        modules' BatchNorm statistics, the head)
  best.safetensors      the same tensors at the best epoch so far
  optimizer.safetensors the optimiser's per-parameter state, flattened to
                        "state.<index>.<key>"; its param groups' scalars live in state.json
  history.csv           the history so far, for people
It is rewritten as a whole at the end of every epoch (atomic_dir), so an interrupted run
leaves the previous epoch's checkpoint intact. `TrainState` is what the epochs have done;
save/restore turn a run's state into these files and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as tensors_bytes

from tlearn.core.atomic import atomic_dir, atomic_file, read_json, recover_dir, write_json
from tlearn.core.errors import ArtifactError, UsageError
from tlearn.train.build import Setup
from tlearn.train.history import history_csv

CHECKPOINT_DIR = "checkpoint"
STATE = "state.json"
WEIGHTS = "weights.safetensors"
BEST = "best.safetensors"
OPTIMIZER = "optimizer.safetensors"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) that together hold `opt.state_dict()`."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            elif value is None or isinstance(value, (int, float, bool, str)):
                scalars.setdefault(str(idx), {})[key] = value
            else:
                raise TypeError(f"cannot store optimiser state {key} of type {type(value)}")
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise ArtifactError(
            "the checkpoint's optimiser groups do not match this network; start a new run"
        )
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    model_dir: str | Path,
    state: dict,
    weights: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor] | None,
    opt: torch.optim.Optimizer,
) -> Path:
    path = Path(model_dir) / CHECKPOINT_DIR
    # the model directory holds the checkpoint until the model joins it (its folder was
    # checked when the run started)
    Path(model_dir).mkdir(exist_ok=True)
    opt_tensors, opt_meta = optimizer_to_flat(opt)
    with atomic_dir(path, force=True) as tmp:
        # save() + write_bytes: safetensors' save_file makes 0600 files whatever the umask
        (tmp / WEIGHTS).write_bytes(tensors_bytes(_cpu(weights)))
        if best is not None:
            (tmp / BEST).write_bytes(tensors_bytes(_cpu(best)))
        (tmp / OPTIMIZER).write_bytes(tensors_bytes(opt_tensors))
        write_json(tmp / STATE, {**state, "optimizer": opt_meta})
    return path


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def recover_checkpoint(model_dir: str | Path) -> None:
    """Undo a replacement of the model directory or of its checkpoint that a kill
    interrupted between two renames (core.atomic.recover_dir)."""
    recover_dir(model_dir)
    recover_dir(Path(model_dir) / CHECKPOINT_DIR)


def has_checkpoint(model_dir: str | Path) -> bool:
    recover_checkpoint(model_dir)
    return (Path(model_dir) / CHECKPOINT_DIR / STATE).is_file()


def check_new_run(out_dir: Path, force: bool) -> None:
    """A new run may write `out_dir`: it does not exist, or --force was given."""
    if out_dir.exists() and not force:
        if has_checkpoint(out_dir):
            raise ArtifactError(
                f"{out_dir} holds an unfinished training run; continue it with --resume "
                f"{out_dir}, or pass --force to start over"
            )
        raise ArtifactError(f"{out_dir} already exists; choose another -o or pass --force")


def read_state(model_dir: str | Path) -> dict:
    recover_checkpoint(model_dir)
    path = Path(model_dir) / CHECKPOINT_DIR / STATE
    if not path.is_file():
        raise ArtifactError(
            f"{model_dir} has no training checkpoint to resume ({CHECKPOINT_DIR}/{STATE}); "
            "start a new run with -o (and --force to replace it)"
        )
    state = read_json(path, ArtifactError, "; start a new run")
    if not isinstance(state, dict) or state.get("format") != "tlearn-checkpoint":
        raise ArtifactError(f"{path}: not a tlearn checkpoint; start a new run")
    if state.get("format_version") != 1:
        raise ArtifactError(
            f"{path}: checkpoint format_version {state.get('format_version')} is not "
            "supported by this tlearn (supports 1); finish it with the tlearn that wrote it"
        )
    return state


def load_tensors(model_dir: str | Path, name: str) -> dict[str, torch.Tensor] | None:
    path = Path(model_dir) / CHECKPOINT_DIR / name
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"{path}: unreadable checkpoint file ({e}); start a new run") from None


# ----------------------------------------------------------------------------- a run's state


@dataclass
class TrainState:
    """What the epochs have done so far."""

    start_epoch: int = 0  # the first epoch still to run
    step: int = 0  # optimiser steps taken
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "val_acc", "val_loss"}
    best_weights: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    # --time-limit stopped this invocation (not saved: --resume may continue the run)
    time_limited: bool = False
    epochs_planned: int | None = None  # --epochs before the time limit shortened the run


def mutable_state(setup: Setup) -> dict[str, torch.Tensor]:
    """A copy of the tensors training can change."""
    sd = setup.net.state_dict()
    return {k: v.detach().clone() for k, v in sd.items() if k in setup.mutable}


def _load_mutable(setup: Setup, tensors: dict[str, torch.Tensor]) -> None:
    want = set(setup.mutable)
    if set(tensors) != want:
        raise ArtifactError(
            "the checkpoint's tensors do not match this network (settings changed?); "
            "start a new run"
        )
    sd = setup.net.state_dict()
    for k, v in tensors.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ArtifactError(f"checkpoint tensor {k} has the wrong shape; start a new run")
    setup.net.load_state_dict(tensors, strict=False)


def _state_json(setup: Setup, state: TrainState, epoch_done: int) -> dict:
    scaler = setup.amp.scaler
    return {
        "format": "tlearn-checkpoint",
        "format_version": 1,
        "epoch": epoch_done,
        "step": state.step,
        "settings": setup.settings.to_dict(),
        "fingerprint": setup.fingerprint,
        "history": state.history,
        "best": state.best,
        "stopped_early": state.stopped_early,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def save(setup: Setup, state: TrainState, epoch_done: int) -> None:
    """The checkpoint after `epoch_done` epochs."""
    save_checkpoint(
        setup.out_dir,
        _state_json(setup, state, epoch_done),
        mutable_state(setup),
        state.best_weights,
        setup.optimizer,
    )
    with atomic_file(setup.out_dir / CHECKPOINT_DIR / "history.csv", "w") as f:
        f.write(history_csv(state.history))


def restore(setup: Setup, saved: dict) -> TrainState:
    """Load the checkpoint whose state.json holds `saved` into the set-up network and
    optimiser; returns the state of its epochs."""
    out_dir = setup.out_dir
    if saved.get("fingerprint") != setup.fingerprint:
        raise UsageError(
            "the images differ from those the checkpoint was trained on (files added, "
            "removed or relabelled); resume with the same data, or start a new run"
        )
    weights = load_tensors(out_dir, WEIGHTS)
    if weights is None:
        raise ArtifactError(f"{out_dir}: checkpoint has no {WEIGHTS}; start a new run")
    _load_mutable(setup, weights)
    best_weights = load_tensors(out_dir, BEST)
    opt_tensors = load_tensors(out_dir, OPTIMIZER) or {}
    optimizer_from_flat(setup.optimizer, opt_tensors, saved["optimizer"])
    if setup.amp.scaler is not None and saved.get("scaler"):
        setup.amp.scaler.load_state_dict(saved["scaler"])
    return TrainState(
        start_epoch=int(saved["epoch"]),
        step=int(saved["step"]),
        history=list(saved.get("history", [])),
        best=saved.get("best"),
        best_weights=best_weights,
        stopped_early=bool(saved.get("stopped_early")),
    )
