"""The per-epoch history of a run as files: history.csv (in the model directory and in
each checkpoint) and curves.png (loss and accuracy per epoch)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tlearn.report.plots import plot_curves

HISTORY_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "seconds",
    "images_per_s",
)


def history_csv(history: list[dict]) -> str:
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        vals = []
        for c in HISTORY_COLUMNS:
            v = row.get(c)
            vals.append("" if v is None else (str(v) if c == "epoch" else f"{v:.6g}"))
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


def curves_png(history: list[dict]) -> bytes:
    """curves.png for the model directory: loss and accuracy per epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "history.csv"
        src.write_text(history_csv(history), encoding="utf-8")
        return plot_curves(src, Path(tmp) / "curves.png").read_bytes()
