"""`fit --preset NAME` and `--time-limit DURATION` on the command line: the options, the
preset applied to fit's arguments (explicit options win), and the lines that show the
recipe and the time estimate. The recipes themselves: tlearn.core.presets."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from tlearn.cli.options import Head, Pool
from tlearn.cli.train import Augment, given
from tlearn.core.deadline import Deadline, parse_duration
from tlearn.core.errors import UsageError
from tlearn.core.presets import PRESETS, Recipe, flag, resolve_preset
from tlearn.data.scan import has_split_folders

PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        metavar="|".join(PRESETS),
        help="A tuned recipe. fast: today's default (final features, linear SVM, C by CV). "
        "balanced: the cut (a layer or a pair) and C by CV, on tf_efficientnet_lite1 when "
        "installed. best: on the largest bundled backbone, the cut searched by a linear "
        "probe, a linear head there, one head-only epoch, then the last stage fine-tuned "
        "with layer decay, crop/flip/colour augmentation, label smoothing, early stopping "
        "on a 15% validation split (unless there is a val set), the best epoch and TTA by "
        "validation, 55m time limit. Options "
        "you give override the preset's; the recipe is printed and saved in config.json.",
    ),
]
TimeLimitOpt = Annotated[
    str | None,
    typer.Option(
        "--time-limit",
        metavar="DURATION",
        help="Stop early, keeping the best model so far: e.g. 90s, 30m, 1h, 1h30m. Neural "
        "heads stop at the end of the last epoch that fits; svm/logreg stop the layer sweep "
        "and the C grid.",
    ),
]

# options a preset sets whose typer type is an enum (the rest are plain values)
ENUMS: dict[str, type[Enum]] = {"head": Head, "augment": Augment, "pool": Pool}


def _plain(v):
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, Path):
        return str(v)
    return v


def start_deadline(text: str | None) -> Deadline | None:
    """--time-limit, parsed strictly; the clock starts now (when the command starts)."""
    return None if text is None else Deadline(parse_duration(text))


def apply_preset(ctx: typer.Context, params: dict) -> Recipe | None:
    """Write preset params['preset']'s values into `params` (fit's arguments as typer
    converted them), except for options given on the command line; returns the recipe
    (None without --preset)."""
    name = params.get("preset")
    if name is None:
        return None
    if params.get("resume") is not None:
        raise UsageError(
            "--preset starts a new run; --resume continues one with its saved settings: "
            "drop --preset"
        )
    user = {k: _plain(v) for k, v in params.items() if k in ctx.params and given(ctx, k)}
    has_val = params.get("val") is not None or (
        params.get("labels") is None and has_split_folders(params["data"])
    )
    recipe = resolve_preset(str(name).strip().lower(), given=user, has_val=has_val)
    for key, value in recipe.applied.items():
        params[key] = ENUMS[key](value) if key in ENUMS else value
    return recipe


def recipe_lines(recipe: Recipe) -> list[str]:
    """What --preset prints on stderr before the run."""
    lines = [f"preset {recipe.name}: " + " ".join(flag(k, v) for k, v in recipe.applied.items())]
    if recipe.overridden:
        mine = ", ".join(
            f"{flag(k, v)} (preset: {recipe.values[k]})" for k, v in recipe.overridden.items()
        )
        lines.append(f"  given, so kept: {mine}")
    for key, why in recipe.dropped.items():
        lines.append(f"  not applied: {flag(key, recipe.values[key])} ({why})")
    lines += [f"  {n}" for n in recipe.notes]
    return lines
