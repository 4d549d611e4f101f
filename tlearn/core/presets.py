"""`fit --preset fast|balanced|best`: named recipes, each a set of fit option values.

A recipe is plain data (option name -> value, by the name of fit's Python parameter), so
it can be printed before a run and recorded in config.json. Options the user gives
explicitly win over the preset's; the resolved recipe says which ones did.

fast      today's default: penultimate features of the default backbone, linear SVM, C by
          cross-validation (calibrated as every fit is).
balanced  the cut chosen by cross-validation among the backbone's stages and pairs of the
          best stages (`--layer auto`), C by cross-validation, on the middle bundled
          backbone (tf_efficientnet_lite1 when installed).
best      fine-tuning: a new linear head on the largest bundled backbone, the last stage
          trained (--freeze-to auto) with layer-wise rate decay, real image augmentation
          (random-resized crop + flip + colour jitter), label smoothing, early stopping on a
          validation split carved from the training images when there is no other
          validation set, the best epoch kept, within a time limit.
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
    "cut: the backbone's final pooled features (no layer sweep before fine-tuning: it would "
    "cost another pass over every image, and the trained last stage adapts those features)",
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
            "freeze_to": "auto",
            "layer_decay": 0.5,
            "augment": "standard",
            "label_smoothing": 0.1,
            "epochs": 12,
            "patience": 3,
            "time_limit": "55m",
            "choose_tta": True,
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

    @property
    def applied(self) -> dict:
        return {k: v for k, v in self.values.items() if k not in self.overridden}

    def to_config(self) -> dict:
        """config.json's "preset"."""
        return {
            "name": self.name,
            "set": self.applied,
            "overridden": {
                k: {"preset": self.values[k], "given": v} for k, v in self.overridden.items()
            },
            "notes": list(self.notes),
        }


def resolve_preset(name: str, *, given: dict, has_val: bool) -> Recipe:
    """Preset `name` against the options the user gave explicitly (`given`: option ->
    value). The preset's value of an option the user gave is overridden."""
    if name not in PRESETS:
        raise UsageError(f"unknown --preset '{name}'; allowed: {', '.join(PRESETS)}")
    values, notes = recipe_values(name, has_val=has_val)
    overridden = {k: given[k] for k in values if k in given}
    return Recipe(name=name, values=values, overridden=overridden, notes=notes)


def flag(option: str, value) -> str:
    """An option and its value as the user would type it: --freeze-to auto."""
    return f"--{option.replace('_', '-')} {value}"
