"""PNG plots: sweep accuracy vs depth, layer shapes, confusion matrix, worst mistakes,
training curves and class heatmap overlays.

matplotlib is imported inside each function (the CLI starts fast without it) and used
through its object API with the Agg canvas: no pyplot, no global backend switch, nothing
interactive. Every PNG is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlearn.core.atomic import atomic_file
from tlearn.data.image import load_image

DPI = 100


def _figure(width: float, height: float):
    # matplotlib costs ~1 s to import: only drawing a plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    with atomic_file(out_png, "wb") as f:
        f.write(buf.getvalue())
    return out_png


def _short(n: int) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- sweep


def plot_sweep(sweep: dict, out_png: str | Path) -> Path:
    """CV accuracy (+- std) per cut in depth order, cumulative GFLOPs on a second axis;
    the recommended cut is starred and the best pair drawn as a dashed line."""
    rows = sweep["layers"]
    x = np.arange(len(rows))
    acc = np.asarray([r.get("cv_score", r.get("cv_accuracy")) for r in rows])
    std = np.asarray([r["cv_std"] for r in rows])
    gflops = np.asarray([r["gflops"] for r in rows])
    labels = [f"{r['layer']}\n{r['feature_dim']}-d" for r in rows]

    fig = _figure(max(6.0, 0.85 * len(rows) + 2), 4.6)
    ax = fig.add_subplot()
    cost = ax.twinx()
    cost.bar(x, gflops, width=0.6, color="0.85", zorder=0, label="cumulative GFLOPs")
    cost.set_ylabel("cumulative GFLOPs per image", color="0.4")
    cost.tick_params(axis="y", colors="0.4")
    ax.set_zorder(cost.get_zorder() + 1)
    ax.patch.set_visible(False)
    metric = sweep.get("metric", "accuracy")
    ax.errorbar(x, acc, yerr=std, marker="o", color="tab:blue", capsize=3, label=f"CV {metric}")
    rec = sweep["recommended"]["layer"]
    if rec in [r["layer"] for r in rows]:
        i = [r["layer"] for r in rows].index(rec)
        ax.plot(
            [i],
            [acc[i]],
            marker="*",
            markersize=18,
            color="tab:orange",
            linestyle="none",
            label=f"recommended: {rec} ({acc[i]:.3f})",
        )
    pair = sweep.get("best_pair")
    if pair:
        pair_score = pair.get("cv_score", pair.get("cv_accuracy"))
        ax.axhline(
            pair_score,
            color="tab:green",
            linestyle="--",
            linewidth=1,
            label=f"best pair: {pair['layer']} ({pair_score:.3f})",
        )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(f"cross-validated {metric}")
    lo = float(np.nanmin(acc - std)) if len(acc) else 0.0
    ax.set_ylim(max(0.0, lo - 0.05), min(1.01, float(np.nanmax(acc + std)) + 0.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        f"{sweep['model']}: where to cut ({sweep['n_images']} images, "
        f"{sweep['folds']}-fold CV, {sweep['head']})",
        fontsize=10,
    )
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- layers


def plot_layers(layers: Sequence, out_png: str | Path, title: str = "") -> Path:
    """Output shape (channels and spatial size) and parameters per layer, with cumulative
    GFLOPs. `layers` are backbone.LayerInfo (or objects with the same attributes)."""
    x = np.arange(len(layers))
    channels = [li.shape[0] if li.shape else 0 for li in layers]
    spatial = [li.shape[-1] if len(li.shape) == 3 else np.nan for li in layers]
    cum_params = np.asarray([li.params for li in layers], dtype=float)
    own_params = np.diff(np.concatenate([[0.0], cum_params]))
    gflops = [li.gflops for li in layers]
    stage = [getattr(li, "stage", None) is not None for li in layers]

    fig = _figure(max(6.0, 0.6 * len(layers) + 2), 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    colors = ["tab:blue" if s else "tab:gray" for s in stage]
    top.bar(x, channels, color=colors)
    top.set_ylabel("output channels (bars)")
    top.set_ylim(0, max(channels + [1]) * 1.1)
    side = top.twinx()
    side.plot(x, spatial, marker="o", color="tab:red")
    side.set_ylabel("output height = width", color="tab:red")
    side.set_yscale("log", base=2)
    top.set_title(
        (title + ": " if title else "") + "output shape per layer (blue: timm feature stage)",
        fontsize=10,
    )

    bottom.bar(x, own_params, color=colors)
    bottom.set_ylabel("parameters added since the previous bar")
    bottom.yaxis.set_major_formatter(_count_formatter())
    flops = bottom.twinx()
    flops.plot(x, gflops, marker=".", color="tab:green")
    flops.set_ylabel("cumulative GFLOPs", color="tab:green")
    ticks = [f"{li.name}\n{'x'.join(map(str, li.shape))}" for li in layers]
    bottom.set_xticks(x, ticks, rotation=60, ha="right", fontsize=8)
    return _save(fig, out_png)


def _count_formatter():
    # matplotlib costs ~1 s to import: only drawing a plot needs it
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: _short(int(v)))


# ----------------------------------------------------------------------------- evaluate


def plot_confusion(metrics: dict, out_png: str | Path) -> Path:
    """Two panels: counts, and rows normalised to 1 (recall on the diagonal)."""
    labels = metrics["confusion"]["labels"]
    counts = np.asarray(metrics["confusion"]["matrix"], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(labels)
    side = min(12.0, 2.0 + 0.55 * k)
    fig = _figure(2 * side + 1, side + 0.6)
    for ax, mat, title, fmt in (
        (fig.add_subplot(1, 2, 1), counts, "counts", "{:.0f}"),
        (fig.add_subplot(1, 2, 2), norm, "row-normalised (recall on the diagonal)", "{:.2f}"),
    ):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(mat.max(), 1e-9))
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
        if k <= 30:
            cut = mat.max() / 2
            for i in range(k):
                for j in range(k):
                    ax.text(
                        j,
                        i,
                        fmt.format(mat[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if mat[i, j] > cut else "black",
                    )
    acc = metrics.get("accuracy")
    if acc is not None:
        fig.suptitle(f"{metrics.get('n_images', int(counts.sum()))} images, accuracy {acc:.3f}")
    return _save(fig, out_png)


def plot_contact_sheet(
    items: Sequence[dict],
    out_png: str | Path,
    title: str = "",
    columns: int = 4,
    empty: str = "no misclassified images",
) -> Path:
    """A grid of images with a caption each. items: {"path", "caption"}; an unreadable
    image shows as a grey tile with its caption; `empty` is the text shown for none."""

    n = max(1, len(items))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.0 * cols, 3.2 * rows + 0.4)
    for i, item in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        try:
            img = load_image(item["path"])
            img.thumbnail((320, 320))
            ax.imshow(np.asarray(img))
        except Exception:
            ax.imshow(np.full((10, 10, 3), 200, np.uint8))
            item = {**item, "caption": item["caption"] + "\n(image not readable)"}
        ax.set_title(item["caption"], fontsize=8)
        ax.set_axis_off()
    if not items:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, empty, ha="center", va="center")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out_png)


def worst_mistakes(
    paths: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    limit: int = 16,
) -> list[dict]:
    """Misclassified images, most confident mistakes first: ranked by the predicted
    class's score minus the true class's score."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = np.asarray(scores, dtype=float)
    wrong = np.flatnonzero(y_true != y_pred)
    gap = scores[wrong, y_pred[wrong]] - scores[wrong, y_true[wrong]]
    order = wrong[np.argsort(-gap, kind="stable")][:limit]
    return [
        {
            "path": str(paths[i]),
            "true": classes[y_true[i]],
            "predicted": classes[y_pred[i]],
            "score": float(scores[i, y_pred[i]]),
            "caption": f"{Path(paths[i]).name}\ntrue {classes[y_true[i]]}, "
            f"predicted {classes[y_pred[i]]} ({scores[i, y_pred[i]]:.2f})",
        }
        for i in order
    ]


def write_evaluation_plots(out_dir: str | Path, result, limit: int = 16) -> list[Path]:
    """confusion.png and worst.png (the most confident mistakes) for a
    pipeline.EvaluateResult that carries per-image predictions."""
    out_dir = Path(out_dir)
    m = result.metrics
    written: list[Path] = []
    if m.get("confusion"):
        written.append(plot_confusion(m, out_dir / "confusion.png"))
    if getattr(result, "reliability", None) is not None:
        written.append(plot_reliability(result.reliability, out_dir / "reliability.png", m))
    if getattr(result, "y_pred", None) is not None and len(result.paths):
        classes = m["confusion"]["labels"]
        worst = worst_mistakes(
            result.paths, result.y_true, result.y_pred, result.scores, classes, limit
        )
        n_wrong = int(np.sum(np.asarray(result.y_true) != np.asarray(result.y_pred)))
        title = (
            f"{len(worst)} most confident of {n_wrong} mistakes (score: {result.score_kind})"
            if worst
            else "no misclassified images"
        )
        written.append(plot_contact_sheet(worst, out_dir / "worst.png", title))
    return written


def plot_reliability(bins: dict, out_png: str | Path, metrics: dict) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin (the diagonal is
    perfect calibration), with the number of images per bin below."""
    edges = np.asarray(bins["edges"])
    count = np.asarray(bins["count"])
    used = count > 0
    mid = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig = _figure(5.5, 6.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], ls="--", color="0.5", label="perfect calibration")
    top.bar(mid[used], np.asarray(bins["accuracy"])[used], width=width * 0.9, alpha=0.6,
            color="tab:blue", edgecolor="tab:blue", label="accuracy in bin")  # fmt: skip
    top.plot(np.asarray(bins["confidence"])[used], np.asarray(bins["accuracy"])[used], "o",
             color="tab:red", label="(mean confidence, accuracy)")  # fmt: skip
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    what = "label probabilities" if metrics.get("task") == "multi-label" else "top class"
    cal = "calibrated" if metrics.get("calibrated") else "not calibrated"
    parts = [f"{k} {metrics[k]:.3f}" for k in ("ece", "nll", "brier") if metrics.get(k) is not None]
    top.set_title(f"reliability ({what}, {cal}): " + ", ".join(parts), fontsize=9)
    bottom.bar(mid, count, width=width * 0.9, color="0.6")
    bottom.set_xlabel("confidence (predicted probability)")
    bottom.set_ylabel("images" if what == "top class" else "pairs")
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- training


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_curves(history_csv: str | Path, out_png: str | Path) -> Path:
    """Loss and accuracy per epoch from a training history CSV with columns epoch, lr,
    train_loss, train_acc, val_loss, val_acc (val columns may be empty)."""
    # matplotlib costs ~1 s to import: only drawing a plot needs it
    from matplotlib.ticker import MaxNLocator

    with open(history_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    col = {k: np.asarray([_float(r.get(k, "")) for r in rows]) for k in rows[0]} if rows else {}
    epoch = col.get("epoch", np.arange(1, len(rows) + 1))
    fig = _figure(10, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, key, name in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = col.get(f"{split}_{key}")
            if values is not None and np.isfinite(values).any():
                ax.plot(epoch, values, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if "val_acc" in col and np.isfinite(col["val_acc"]).any():
        best = int(np.nanargmax(col["val_acc"]))
        acc_ax.set_title(f"best val accuracy {col['val_acc'][best]:.3f} at epoch {epoch[best]:g}")
    if "lr" in col and np.isfinite(col["lr"]).any():
        lr_ax = loss_ax.twinx()
        lr_ax.plot(epoch, col["lr"], ":", color="0.5", label="lr")
        lr_ax.set_ylabel("learning rate (dotted)", color="0.5")
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- heatmaps


def upsample(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to size (H, W), as torch does it."""
    # torch's interpolation: heatmaps run in torch anyway
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(score_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def plot_heatmap(
    image: np.ndarray,
    score_map: np.ndarray,
    out_png: str | Path,
    title: str,
    label: str,
    alpha: float = 0.5,
) -> Path:
    """The image the model saw, and the same image under the class score map upsampled
    to it: red = evidence for the class, blue = against (colour scale centred on 0)."""
    h, w = image.shape[:2]
    up = upsample(score_map, (h, w))
    lim = float(np.abs(up).max()) or 1.0
    fig = _figure(9, 4.6)
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title("input (as the model saw it)", fontsize=9)
    right.imshow(image)
    im = right.imshow(up, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=alpha)
    right.set_title(f"{score_map.shape[0]}x{score_map.shape[1]} map, upsampled", fontsize=9)
    fig.colorbar(im, ax=right, shrink=0.85, label=label)
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_png)
