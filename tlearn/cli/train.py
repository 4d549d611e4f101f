"""Command-line side of `tlearn fit --head linear|mlp`: the options (shown in their own
help panel), one call to train.fit_nn / train.resume_nn, and the rendering: the
parameter-group table, one progress bar per epoch, and the summary table.

Part of the CLI layer (typer and rich live here), kept apart from cli.py so the neural
head's many options do not crowd the rest.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tlearn.cli.render import (
    Bars,
    engine_note,
    estimate_line,
    posthoc_lines,
    print_validation,
    report_skips,
)
from tlearn.core.errors import UsageError
from tlearn.core.options import RunOptions

PANEL = "Neural head and fine-tuning (--head linear|mlp)"


class Freeze(str, Enum):
    all = "all"
    none = "none"


class BN(str, Enum):
    frozen = "frozen"
    train = "train"


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Augment(str, Enum):
    none = "none"
    flip = "flip"
    light = "light"
    standard = "standard"


class ClassWeight(str, Enum):
    balanced = "balanced"


class Cache(str, Enum):
    memory = "memory"
    disk = "disk"
    off = "off"


def _opt(*names, help: str, **kw):
    return typer.Option(*names, help=help, rich_help_panel=PANEL, **kw)


HiddenOpt = Annotated[
    str | None, _opt("--hidden", help="mlp: hidden layer sizes, e.g. 512 or 512,256 (default 512).")
]
DropoutOpt = Annotated[
    float | None,
    _opt(
        "--dropout",
        help="Dropout: before the linear layer (default 0.2), or after each mlp "
        "hidden layer (default 0.5).",
        min=0.0,
        max=0.99,
    ),
]
HeadBNOpt = Annotated[bool, _opt("--head-bn", help="mlp: batch norm after each hidden layer.")]
FreezeOpt = Annotated[
    Freeze | None,
    _opt("--freeze", help="all: only the head trains (the default); none: everything trains."),
]
FreezeToOpt = Annotated[
    str | None,
    _opt(
        "--freeze-to",
        help="Freeze everything up to and including LAYER (a name from "
        "`tlearn layers`), train the rest; auto: the stage before the last one (e.g. blocks.4). "
        "The default when --layer-decay is given.",
        metavar="LAYER",
    ),
]
FreezeEpochsOpt = Annotated[
    int,
    _opt(
        "--freeze-epochs",
        help="Train the head alone for N epochs first, then unfreeze "
        "as requested (fastai's fine_tune).",
        min=0,
    ),
]
BNOpt = Annotated[
    BN,
    _opt(
        "--bn",
        help="BatchNorm in frozen parts: frozen (eval mode, fixed statistics) or "
        "train (statistics update; disables caching).",
    ),
]
LROpt = Annotated[
    float | None, _opt("--lr", help="The head's learning rate (default 1e-3 adamw, 1e-2 sgd).")
]
LayerDecayOpt = Annotated[
    float | None,
    _opt(
        "--layer-decay",
        help="Each layer group below the head learns D times slower than the "
        "one above (timm's layer-wise decay; default 0.5 when the backbone trains).",
        metavar="D",
    ),
]
LRGroupsOpt = Annotated[
    str | None,
    _opt(
        "--lr-groups",
        help="Explicit rates per module group, 0 = frozen, e.g. 'conv_stem,bn1,blocks.0-1=0; "
        "blocks.2-4=1e-4; blocks.5-6=3e-4; head=1e-3'. Modules not named join the group of "
        "the nearest module before them (here conv_head and bn2 join blocks.5-6).",
        metavar="SPEC",
    ),
]
OptimizerOpt = Annotated[Optimizer, _opt("--optimizer", help="AdamW, or SGD with momentum.")]
MomentumOpt = Annotated[float, _opt("--momentum", help="SGD momentum.")]
WeightDecayOpt = Annotated[
    float, _opt("--weight-decay", help="Weight decay (never on norms and biases).")
]
WarmupOpt = Annotated[
    float, _opt("--warmup-epochs", help="Linear warm-up before the cosine schedule.")
]
SmoothingOpt = Annotated[float, _opt("--label-smoothing", help="Label smoothing.")]
ClassWeightOpt = Annotated[
    ClassWeight | None,
    _opt("--class-weight", help="balanced: weight the loss by inverse class frequency."),
]
EpochsOpt = Annotated[int, _opt("--epochs", help="Epochs to train.", min=1)]
PatienceOpt = Annotated[
    int | None,
    _opt(
        "--patience",
        help="Stop after N epochs without a better validation accuracy "
        "(default: never); the best epoch's weights are kept either way.",
        min=1,
    ),
]
AugmentOpt = Annotated[
    Augment | None,
    _opt(
        "--augment",
        help="none; flip; light: random-resized crop + flip (AlexNet's recipe); "
        "standard: light + colour jitter. Default: light when the backbone trains, else flip. "
        "With none or flip, frozen layers run "
        "once and are cached; flip then mirrors the cached feature maps of a partly frozen "
        "network, a cheap approximation of mirroring the image.",
    ),
]
ChooseTTAOpt = Annotated[
    bool,
    _opt(
        "--choose-tta/--no-choose-tta",
        help="After training, score the validation images with and without flip TTA and "
        "record the better one: predict/evaluate use it unless --tta says otherwise.",
    ),
]
CompareSVMOpt = Annotated[
    bool,
    _opt(
        "--compare-svm/--no-compare-svm",
        help="After training, fit a linear SVM on the frozen features at the same cut and "
        "keep it instead if it scores higher on the validation images (ties keep the "
        "network).",
    ),
]
CacheOpt = Annotated[
    Cache,
    _opt(
        "--cache",
        help="Where cached outputs of frozen layers live: memory (fp16 maps), "
        "disk (memory-mapped, under --cache-dir), or off (run every layer every epoch).",
    ),
]
CacheDirOpt = Annotated[
    Path | None, _opt("--cache-dir", help="Folder for --cache disk (default: system temp).")
]
ResumeOpt = Annotated[
    Path | None,
    _opt(
        "--resume",
        help="Continue the interrupted run in MODEL_DIR from its last checkpoint (same settings).",
        metavar="MODEL_DIR",
    ),
]

# fit options that only mean something for neural heads (CLI name -> TrainOptions field)
NN_ONLY = {
    "hidden": "hidden",
    "dropout": "dropout",
    "head_bn": "head_bn",
    "freeze": "freeze",
    "freeze_to": "freeze_to",
    "freeze_epochs": "freeze_epochs",
    "bn": "bn",
    "lr": "lr",
    "layer_decay": "layer_decay",
    "lr_groups": "lr_groups",
    "optimizer": "optimizer",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "label_smoothing": "label_smoothing",
    "class_weight": "class_weight",
    "epochs": "epochs",
    "patience": "patience",
    "augment": "augment",
    "cache": "cache",
    "cache_dir": "cache_dir",
    "choose_tta": "choose_tta",
}
# other fit options that change a run (CLI name -> Settings / TrainOptions key)
RUN_KEYS = {
    "head": "head",
    "model": "model",
    "weights": "weights",
    "layer": "layers",
    "pool": "pool",
    "seed": "seed",
    "val": "val",
    "val_split": "val_split",
    "labels": "labels_csv",
    "batch_size": "batch_size",
}


def _value(v):
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, Path):
        return str(v)
    return v


def given(ctx: typer.Context, name: str) -> bool:
    # Compared by name: typer may ship its own copy of click's ParameterSource enum.
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


# neural-head options that are not training options (jobs.fit_neural, a new run only)
NEW_RUN_ONLY = ("compare_svm",)


def check_not_nn(ctx: typer.Context) -> None:
    """Neural-head options given with --head svm|logreg are a mistake: say so."""
    for name in (*NN_ONLY, *NEW_RUN_ONLY):
        if given(ctx, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} applies to neural heads only; add --head linear or --head mlp "
                "(the default --head svm has no epochs or learning rates)"
            )


def fit_nn_command(ctx: typer.Context, p: dict, err, out) -> None:
    """`tlearn fit --head linear|mlp` and `--resume`. `p`: fit's arguments as typer
    converted them; `ctx` tells which of them were given."""
    # fine-tuning needs torch: only this command loads it
    from tlearn.jobs.fit_neural import fit_neural
    from tlearn.train.api import resume_nn
    from tlearn.train.options import TrainOptions

    quiet = p["quiet"]
    if p.get("C") is not None and given(ctx, "C"):
        raise UsageError("--C applies to --head svm|logreg; neural heads use --lr and --epochs")
    view = TrainView(err, quiet)
    try:
        with view:
            run = RunOptions(
                batch_size=p["batch_size"],
                device=p["device"],
                workers=p["workers"],
                progress=view.progress_cb,
                backend=_value(p["backend"]),
                cache=not p["no_cache"],
                deadline=p.get("deadline"),
                note=None if quiet else view.note,
            )
            if p["resume"] is not None:
                for name in NEW_RUN_ONLY:
                    if given(ctx, name):
                        flag = "--" + name.replace("_", "-")
                        raise UsageError(f"{flag} applies to a new run; --resume finishes one")
                same = (
                    p["output"] is None
                    or Path(p["output"]).resolve() == Path(p["resume"]).resolve()
                )
                if not same:
                    raise UsageError("--resume continues MODEL_DIR in place; drop -o or repeat it")
                changed = {}
                for name, key in {**NN_ONLY, **RUN_KEYS}.items():
                    if given(ctx, name):
                        changed[key] = _value(p[name])
                if "layers" in changed and isinstance(changed["layers"], str):
                    changed["layers"] = [
                        s.strip() for s in changed["layers"].split(",") if s.strip()
                    ]
                res = resume_nn(p["resume"], p["data"], changed=changed, run=run, events=view.event)
            else:
                if p["output"] is None:
                    raise UsageError("missing -o/--output: the model directory to create")
                options = TrainOptions(
                    head=_value(p["head"]),
                    **{field: _value(p[name]) for name, field in NN_ONLY.items()},
                )
                res = fit_neural(
                    p["data"],
                    p["output"],
                    options=options,
                    model=p["model"],
                    weights=p["weights"],
                    layers=p["layer"],
                    pool=_value(p["pool"]),
                    val=p["val"],
                    val_split=p["val_split"],
                    labels_csv=p["labels"],
                    seed=p["seed"],
                    force=p["force"],
                    run=run,
                    events=view.event,
                    preset=p.get("preset_config"),
                    compare_svm=p["compare_svm"],
                )
    except KeyboardInterrupt:
        _interrupted_hint(err, p)
        raise
    if res is None:  # a torchrun rank other than 0: rank 0 wrote the model and reports
        return
    render_nn_fit(res, quiet=quiet, as_json=p["as_json"], err=err, out=out)


def render_nn_fit(res, *, quiet: bool, as_json: bool, err, out) -> None:
    """What `fit --head linear|mlp` prints: JSON, or the history table, the summary line,
    the choices made on the validation images and the validation table."""
    report_skips(res.skipped, res.warnings, quiet)
    if as_json:
        typer.echo(json.dumps(nn_json(res)))
        return
    if not quiet:
        out.print(history_table(res.history, res.best_epoch))
        if res.features:
            err.print(f"frozen features{engine_note(res.features)}", highlight=False, markup=False)
        if res.prefix_maps:
            pm = res.prefix_maps
            err.print(
                f"frozen prefix maps: {pm['computed']} computed, {pm['cached']} from the cache",
                highlight=False,
                markup=False,
            )
    best = f", best epoch {res.best_epoch}" if res.best_epoch and res.n_val else ""
    stop = " (stopped early)" if res.stopped_early else ""
    if res.time_limited:
        stop = " (stopped for the time limit)"
    elif res.epochs_planned:
        stop = f" (of {res.epochs_planned}: shortened to fit the time limit)"
    out.print(
        f"trained {res.settings['options']['head']} head on {res.n_train} images, "
        f"{len(res.classes)} classes, {len(res.history)} epochs{stop}{best} in "
        f"{res.seconds:.1f}s -> {res.out_dir}",
        highlight=False,
        markup=False,
    )
    if not quiet and res.compared:
        err.print(compared_line(res.compared), highlight=False, markup=False)
    if not quiet:
        for line in posthoc_lines(res.calibration):
            err.print(line, highlight=False, markup=False)
        if res.kept_phase:
            err.print(
                f"unfreezing chosen by validation: epoch {res.best_epoch} kept ({res.kept_phase})",
                highlight=False,
                markup=False,
            )
        if res.tta:
            acc = res.tta["val_accuracy"]
            err.print(
                f"test-time augmentation: {res.tta['chosen']} (validation accuracy "
                f"{acc['none']:.3f} without, {acc['flip']:.3f} with flip); predict and "
                "evaluate use it unless --tta is given",
                highlight=False,
                markup=False,
            )
    print_validation(res.val_metrics, res.n_val)


def compared_line(c: dict) -> str:
    """--compare-svm's outcome, as one line."""
    acc = c["val_accuracy"]
    net = "-" if acc["network"] is None else f"{acc['network']:.3f}"
    line = (
        f"compared on {c['n_val']} validation images: network {net}, linear SVM on the "
        f"frozen features {acc['svm']:.3f} (C={c['svm_C']:g}); "
    )
    if c["kept"] == "svm":
        return line + "kept the SVM (the model directory holds it, not the network)"
    return line + "kept the network"


def nn_json(res) -> dict:
    """What `fit --head linear|mlp --json` prints."""
    return {
        "model_dir": res.out_dir,
        "classes": res.classes,
        "n_train": res.n_train,
        "n_val": res.n_val,
        "mode": res.mode,
        "groups": res.groups,
        "history": res.history,
        "best_epoch": res.best_epoch,
        "stopped_early": res.stopped_early,
        "validation": res.val_metrics,
        "skipped": len(res.skipped),
        "seconds": res.seconds,
        "features": res.features,
        "prefix_maps": res.prefix_maps,
        "calibration": res.calibration,
        "tta": res.tta,
        "time_limited": res.time_limited,
        "epochs_planned": res.epochs_planned,
        "layer_auto": res.layer_auto,
        "kept_phase": res.kept_phase,
        "compared": res.compared,
    }


def _interrupted_hint(err, p) -> None:
    # fine-tuning needs torch: only this command loads it
    from tlearn.train.checkpoint import has_checkpoint, read_state

    target = p["resume"] or p["output"]
    if target is not None and has_checkpoint(target):
        epoch = read_state(target).get("epoch")
        err.print(
            f"epoch {epoch} is saved in {target}; continue with: tlearn fit {p['data']} "
            f"--resume {target}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


# ----------------------------------------------------------------------------- rendering


def _lr(v) -> str:
    return "frozen" if v is None else f"{v:.3g}"


def groups_table(info: dict) -> Table:
    where = {
        "features": "backbone frozen: features computed once",
        "prefix": f"frozen prefix up to {info['split'][0].removeprefix('model.')} cached"
        if info.get("split")
        else "frozen prefix cached",
        "images": "every layer runs every epoch",
    }[info["mode"]]
    t = Table(title=f"parameter groups ({where}; augment {info['augment']})")
    for col, just in (
        ("#", "right"),
        ("modules", "left"),
        ("params", "right"),
        ("lr", "right"),
        ("trains", "left"),
    ):
        t.add_column(col, justify=just, overflow="fold")
    for i, r in enumerate(info["rows"]):
        t.add_row(
            str(i),
            escape(", ".join(r["modules"])),
            "-" if r["n_params"] is None else f"{r['n_params']:,}",
            _lr(r["lr"]),
            "no" if r["frozen"] else "yes",
        )
    return t


def history_table(history: list[dict], best: int | None) -> Table:
    t = Table(title="training history (* = best epoch, kept)")
    for col in ("epoch", "lr", "train loss", "train acc", "val loss", "val acc", "s", "img/s"):
        t.add_column(col, justify="right")
    for r in history:
        mark = " *" if r["epoch"] == best else ""
        t.add_row(
            f"{r['epoch']}{mark}",
            f"{r['lr']:.2e}",
            f"{r['train_loss']:.3f}",
            f"{r['train_acc']:.3f}",
            "-" if r.get("val_loss") is None else f"{r['val_loss']:.3f}",
            "-" if r.get("val_acc") is None else f"{r['val_acc']:.3f}",
            f"{r['seconds']:.1f}",
            f"{r['images_per_s']:.0f}",
        )
    return t


class TrainView:
    """Progress for a training run on stderr: bars on a terminal, one line per epoch
    otherwise; nothing with --quiet (errors still show)."""

    def __init__(self, err, quiet: bool):

        self.err = err
        self.quiet = quiet
        shown = not quiet
        self.bars = Bars(err, enabled=shown and err.is_terminal, info=True, log=shown)
        self.progress_cb = self.bars  # the library's progress callback
        self.epoch_task = None

    @property
    def progress(self):
        return self.bars.progress

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def note(self, text: str) -> None:
        """A line from the library before a long stage (the --layer auto search)."""
        if not self.quiet:
            self.err.print(text, highlight=False, markup=False, soft_wrap=True)

    def event(self, name: str, data: dict) -> None:
        if self.quiet:
            return
        if name == "groups":
            self.err.print(groups_table(data))
        elif name == "epoch_start" and self.progress is not None:
            title = f"epoch {data['epoch']}/{data['epochs']}"
            self.epoch_task = self.bars.add(title, data["total"])
        elif name == "batch" and self.bars.lines is not None and data["done"] < data["total"]:
            # a log: a line every ~10 s of a long epoch (the epoch's end has its own line)
            self.bars.lines(
                f"epoch {data['epoch']}",
                data["done"],
                data["total"],
                info=f"loss {data['loss']:.3f} acc {data['acc']:.3f}",
            )
        elif name == "batch" and self.progress is not None and self.epoch_task is not None:
            self.progress.update(
                self.epoch_task,
                completed=data["done"],
                info=f"loss {data['loss']:.3f} acc {data['acc']:.3f} "
                f"{data['images_per_s']:.0f} img/s",
            )
        elif name == "epoch_end":
            val = (
                ""
                if data.get("val_acc") is None
                else f" | val loss {data['val_loss']:.3f} acc {data['val_acc']:.3f}"
                + (" *" if data.get("best") else "")
            )
            line = (
                f"loss {data['train_loss']:.3f} acc {data['train_acc']:.3f}{val} "
                f"({data['seconds']:.1f}s, {data['images_per_s']:.0f} img/s)"
            )
            if self.progress is not None and self.epoch_task is not None:
                self.progress.update(self.epoch_task, info=line)
            else:
                self.err.print(f"epoch {data['epoch']}: {line}", highlight=False, markup=False)
            if data.get("stopped_early"):
                self.err.print(
                    "stopping early: no better validation accuracy", highlight=False, markup=False
                )
            if data.get("time_limited"):
                kept = data.get("best_epoch")
                self.err.print(
                    "stopping for the time limit: another epoch would end after it"
                    + (f"; keeping epoch {kept}, the best so far" if kept else ""),
                    highlight=False,
                    markup=False,
                )
        elif name == "estimate":
            self.err.print(estimate_line(data), highlight=False, markup=False)
