"""`fit --preset fast|balanced|best`: named recipes, each a set of fit option values.

A recipe is plain data (option name -> value, by the name of fit's Python parameter), so
it can be printed before a run and recorded in config.json. Options the user gives
explicitly win over the preset's; the resolved recipe says which ones did.

fast      today's default: penultimate features of the default backbone, linear SVM, C by
          cross-validation (calibrated as every fit is).
balanced  the cut chosen by cross-validation among the backbone's stages and pairs of the
          best stages (`--layer auto`), C by cross-validation, on the middle bundled
          backbone (tf_efficientnet_lite1 when installed).
best      fine-tuning from the best cut: the cut searched first (`--layer auto`: a linear
          probe on frozen features of every stage and of pairs of the best stages, by
          cross-validation on the training images), a new linear head there on the
          largest bundled backbone; one head-only epoch, then the last stage before the
          cut trained (--freeze-to auto) with layer-wise rate decay, the kept epoch chosen
          by validation across both phases (so the unfreezing is too); real image
          augmentation (random-resized crop + flip + colour jitter), label smoothing,
          early stopping on a validation split carved from the training images when there
          is no other validation set, the best epoch kept, flip TTA or none by
          validation, within a time limit; finally the network against a linear SVM on
          the frozen features at the same cut, the better on validation kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlearn.core.errors import UsageError
from tlearn.core.spec import DEFAULT_MODEL, bundled_weights_file

PRESETS = ("fast", "balanced", "best")
BEST_VAL_SPLIT = 0.15
# The largest first: lite2 (260 px) > lite1 (240 px) > lite0 (224 px).
BUNDLED_BY_SIZE = ("tf_efficientnet_lite2", "tf_efficientnet_lite1", "tf_efficientnet_lite0")

BEST_NOTES = [
    "cut: searched by a linear probe (an SVM on the frozen features of each stage and of "
    "pairs of the best stages, cross-validated on the training images); one extra pass "
    "over the training images, a few percent of the fine-tuning time",
    "unfreezing: the head alone for the first epoch, then the stages after --freeze-to "
    "auto; the best validation epoch is kept, whichever phase it is in",
    "the network against a linear SVM on the frozen features at the same cut "
    "(--compare-svm): the model directory keeps whichever scores higher on the validation "
    "images (a tie keeps the network)",
    "test-time augmentation: flip or none, whichever scores better on the validation "
    "images (--choose-tta); 10crop is not tried (10x the cost of every prediction)",
]


def bundled_models() -> list[str]:
    """Backbones whose offline weights package is installed, largest first."""
    return [m for m in BUNDLED_BY_SIZE if bundled_weights_file(m) is not None]


def largest_bundled(skip: int = 0) -> str:
    """The largest installed bundled backbone (skip=1: the next one down), else the
    default."""
    have = bundled_models()
    if not have:
        return DEFAULT_MODEL
    return have[min(skip, len(have) - 1)]


def recipe_values(name: str, *, has_val: bool) -> tuple[dict, list[str]]:
    """The option values of preset `name` and notes on choices it does not make. has_val:
    the run has a validation set already (--val, --val-split or DATA/val)."""
    if name == "fast":
        return {"head": "svm", "model": DEFAULT_MODEL, "C": "auto"}, []
    if name == "balanced":
        have = bundled_models()
        model = "tf_efficientnet_lite1" if "tf_efficientnet_lite1" in have else DEFAULT_MODEL
        values = {"head": "svm", "model": model, "layer": "auto", "C": "auto"}
        return values, []
    if name == "best":
        values = {
            "head": "linear",
            "model": largest_bundled(),
            "layer": "auto",
            "freeze_to": "auto",
            "freeze_epochs": 1,
            "layer_decay": 0.5,
            "augment": "standard",
            "label_smoothing": 0.1,
            "epochs": 12,
            "patience": 3,
            "time_limit": "55m",
            "choose_tta": True,
            "compare_svm": True,
        }
        if not has_val:
            values["val_split"] = BEST_VAL_SPLIT
        return values, list(BEST_NOTES)
    raise KeyError(name)


@dataclass
class Recipe:
    """A resolved preset: what it set, and what the user gave instead."""

    name: str
    values: dict  # option -> the preset's value (only those not overridden are applied)
    overridden: dict = field(default_factory=dict)  # option -> the user's value
    notes: list[str] = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # option -> why the user's options drop it

    @property
    def applied(self) -> dict:
        return {
            k: v
            for k, v in self.values.items()
            if k not in self.overridden and k not in self.dropped
        }

    def to_config(self) -> dict:
        """config.json's "preset"."""
        return {
            "name": self.name,
            "set": self.applied,
            "overridden": {
                k: {"preset": self.values[k], "given": v} for k, v in self.overridden.items()
            },
            "notes": list(self.notes),
            **({"dropped": dict(self.dropped)} if self.dropped else {}),
        }


def resolve_preset(name: str, *, given: dict, has_val: bool) -> Recipe:
    """Preset `name` against the options the user gave explicitly (`given`: option ->
    value). The preset's value of an option the user gave is overridden."""
    if name not in PRESETS:
        raise UsageError(f"unknown --preset '{name}'; allowed: {', '.join(PRESETS)}")
    values, notes = recipe_values(name, has_val=has_val)
    overridden = {k: given[k] for k in values if k in given}
    dropped = conflicts(values, given)
    return Recipe(name=name, values=values, overridden=overridden, notes=notes, dropped=dropped)


def conflicts(values: dict, given: dict) -> dict:
    """The preset's options that options the user gave make meaningless or contradict
    (option -> why): the user's choice wins there too, instead of an error about a
    combination the user never typed."""
    out: dict = {}
    why_freeze = None
    if given.get("lr_groups") is not None:
        why_freeze = "--lr-groups sets freezing and rates itself"
    elif given.get("freeze") is not None:
        why_freeze = f"--freeze {given['freeze']} says what trains"
    if why_freeze:
        for key in ("freeze_to", "freeze_epochs"):
            if key in values and key not in given:
                out[key] = why_freeze
        if given.get("lr_groups") is not None or given.get("freeze") == "all":
            if "layer_decay" in values and "layer_decay" not in given:
                out["layer_decay"] = why_freeze
    epochs = given.get("epochs")
    f = values.get("freeze_epochs")
    if f and "freeze_epochs" not in given and epochs is not None and epochs <= f:
        why = f"--epochs {epochs} leaves no epoch after the head-only one"
        out.setdefault("freeze_epochs", why)
    return out


def flag(option: str, value) -> str:
    """An option and its value as the user would type it: --freeze-to auto."""
    return f"--{option.replace('_', '-')} {value}"
