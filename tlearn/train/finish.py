"""The end of a run: the kept (best) weights validated once more and written as the model
directory (config, head, the trained backbone if any part of it trained, metrics,
history.csv, curves.png), and the result the CLI reports."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from safetensors.numpy import save

from tlearn.heads.posthoc import CALIBRATION_FILE, PostHoc, fit_multiclass
from tlearn.modeldir import BACKBONE_FILE, build_config, posthoc_bytes, save_model
from tlearn.report.metrics import classification_metrics
from tlearn.train.build import Setup
from tlearn.train.checkpoint import TrainState
from tlearn.train.dist import write_once
from tlearn.train.frozen import Caches
from tlearn.train.history import curves_png, history_csv
from tlearn.train.options import NNFitResult
from tlearn.train.validate import Validation, flip_accuracies, validate


def _train_info(setup: Setup, state: TrainState) -> dict:
    """config.json's "train": how the model was trained."""
    phase = kept_phase(setup, state)
    return {
        "n_images": len(setup.train_set),
        "n_val": len(setup.val_set) if setup.val_set else 0,
        "settings": setup.settings.to_dict(),
        "augment": setup.augment,
        "mode": setup.mode,
        "lr": setup.lr,
        "freeze_to": setup.plan.freeze_to,
        "layer_decay": setup.plan.layer_decay,
        "groups": [r.to_dict() for r in setup.plan.rows],
        "epochs_run": len(state.history),
        "best_epoch": state.best["epoch"] if state.best else None,
        **({"kept_phase": phase} if phase else {}),
        "stopped_early": state.stopped_early,
        **(
            {
                "time_limit": {
                    "seconds": setup.run.deadline.seconds,
                    "reached": state.time_limited,
                    "epochs_planned": state.epochs_planned,
                }
            }
            if setup.run.deadline is not None
            else {}
        ),
    }


def kept_phase(setup: Setup, state: TrainState) -> str | None:
    """With --freeze-epochs, which unfreezing the kept (best validation) epoch had: the
    head alone, or the backbone trained as planned. Validation chooses between them: the
    best epoch is kept whichever phase it falls in."""
    f = setup.options.freeze_epochs
    if not f or state.best is None or not setup.plan.backbone_trains:
        return None
    if state.best["epoch"] <= f:
        return "head only"
    if setup.plan.freeze_to:
        return f"layers after {setup.plan.freeze_to} trained"
    return "backbone trained"


def compared(setup: Setup, val_metrics: dict | None) -> dict | None:
    """--compare-svm: the network's and the SVM's accuracy on the same validation images,
    and which one the model directory keeps (the higher; a tie keeps the network, whose
    score is if anything flattered: its best epoch was chosen on these images)."""
    svm = setup.settings.compared
    if not svm:
        return None
    net = (val_metrics or {}).get("accuracy")
    return {
        "val_accuracy": {"network": net, "svm": svm["accuracy"]},
        "n_val": svm["n_val"],
        "svm_C": svm["C"],
        "kept": "svm" if net is None or svm["accuracy"] > net else "network",
        "rule": "the higher validation accuracy; a tie keeps the network",
    }


def training_features(caches: Caches, limit: int = 8192) -> np.ndarray | None:
    """Pooled features of (up to `limit`) training images when the run cached them."""
    if caches.train is None or caches.train_level != "features" or len(caches.train) == 0:
        return None
    rows = torch.arange(min(limit, len(caches.train)))
    return caches.train.get(rows).float().numpy()


def nn_posthoc(
    setup: Setup, caches: Caches, v: Validation | None, kept: dict
) -> tuple[PostHoc, list[str]]:
    """Temperature scaling and conformal scores on the validation logits; the OOD bank
    from the cached training features (frozen backbone), else from the validation
    images' features (the backbone trained: training images would need another pass)."""
    logits = kept.get("logits")
    y = v[2] if v is not None else None
    if logits is not None and y is not None and len(logits) != len(y):
        logits = None  # a torchrun shard mismatch: calibrate nothing rather than wrongly
    bank = training_features(caches)
    where = "training images"
    if bank is None:
        bank, where = kept.get("features"), "validation images"
    posthoc, notes = fit_multiclass(
        logits,
        y,
        bank,
        seed=setup.settings.seed,
        fitted_on="the validation images' logits",
    )
    if posthoc.ood is not None:
        posthoc.ood_info["bank_from"] = where
    return posthoc, notes


def chosen_tta(setup: Setup) -> dict | None:
    """--choose-tta: flip or none, whichever the validation images score better with
    (ties: none, which costs nothing); config.json's "tta", which predict and evaluate
    use unless --tta is given. None without the option or without validation images."""
    if not setup.options.choose_tta:
        return None
    acc = flip_accuracies(setup)
    if acc is None:
        setup.warnings.append("--choose-tta: no validation images to choose on; predict uses none")
        return None
    return {
        "chosen": "flip" if acc["flip"] > acc["none"] else "none",
        "val_accuracy": {"none": acc["none"], "flip": acc["flip"]},
        "n_images": acc["n"],
    }


def write_model(
    setup: Setup,
    state: TrainState,
    v: Validation | None,
    posthoc: PostHoc | None = None,
    tta: dict | None = None,
) -> dict | None:
    """The model directory; returns the validation metrics (None without validation)."""
    val_metrics = None
    if v is not None:
        val_metrics = classification_metrics(v[2], v[3], setup.classes)
    auto = setup.settings.layer_auto
    net, network = setup.net, setup.network
    backbone_changed = any(k.startswith("model.") for k in setup.mutable)
    head_sd = net.head.state_dict()
    head_tensors = {k: t.detach().cpu().numpy() for k, t in head_sd.items()}
    extra = {
        "history.csv": history_csv(state.history).encode(),
        "curves.png": curves_png(state.history),
    }
    if backbone_changed:
        sd = {k: t.detach().cpu().contiguous().numpy() for k, t in net.model.state_dict().items()}
        extra[BACKBONE_FILE] = save(sd)
    config = build_config(
        cut=network.spec,
        data_config=network.data_config,
        classes=setup.classes,
        head=network.head_cfg,
        feature_dim=network.feature_dim,
        backbone={
            "trained": backbone_changed,
            "file": BACKBONE_FILE if backbone_changed else None,
        },
        train=_train_info(setup, state),
        **({"calibration": posthoc.to_config()} if posthoc is not None else {}),
        **({"preset": setup.settings.preset} if setup.settings.preset else {}),
        **({"tta": tta} if tta is not None else {}),
        **({"layer_auto": auto["summary"]} if auto else {}),
        **({"compared": compared(setup, val_metrics)} if setup.settings.compared else {}),
    )
    if auto:  # the --layer auto sweep's table, as `fit --layer auto --head svm` writes it
        extra["sweep.json"] = (json.dumps(auto["table"], indent=2) + "\n").encode("utf-8")
    if posthoc is not None:
        extra[CALIBRATION_FILE] = posthoc_bytes(posthoc)
    metrics = {"validation": val_metrics, "history": state.history}
    save_model(setup.out_dir, config, head_tensors, metrics=metrics, force=True, extra_files=extra)
    return val_metrics


def finish(setup: Setup, caches: Caches, state: TrainState, t0: float) -> NNFitResult | None:
    """Load the kept weights, validate them and write the model directory (rank 0 under
    torchrun, whose other ranks return None)."""
    if state.best_weights is not None:
        setup.net.load_state_dict(state.best_weights, strict=False)
    kept: dict = {}
    v = validate(setup, caches, kept)
    posthoc, notes = nn_posthoc(setup, caches, v, kept)
    setup.warnings += [n for n in notes if n not in setup.warnings]
    tta = chosen_tta(setup)
    val_metrics = write_once(setup.dist, lambda: write_model(setup, state, v, posthoc, tta))
    if setup.dist is not None and not setup.dist.main:
        return None
    return NNFitResult(
        out_dir=str(setup.out_dir),
        classes=setup.classes,
        n_train=len(setup.train_set),
        n_val=len(setup.val_set) if setup.val_set else 0,
        groups=[r.to_dict() for r in setup.plan.rows],
        mode=setup.mode,
        history=state.history,
        best_epoch=state.best["epoch"] if state.best else None,
        val_metrics=val_metrics,
        stopped_early=state.stopped_early,
        skipped=setup.skipped,
        warnings=setup.warnings,
        seconds=time.perf_counter() - t0,
        settings={**setup.settings.to_dict(), "augment": setup.augment},
        features=None if setup.engine is None else setup.engine.summary(),
        prefix_maps=setup.prefix_maps or None,
        calibration=posthoc.to_config(),
        tta=tta,
        time_limited=state.time_limited,
        epochs_planned=state.epochs_planned,
        layer_auto=(setup.settings.layer_auto or {}).get("summary"),
        kept_phase=kept_phase(setup, state),
        compared=compared(setup, val_metrics),
    )
