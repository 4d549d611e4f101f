"""Time per epoch of tlearn's fine-tuning against a plain hand-written timm training loop
with the same settings, measured in one run: each tlearn epoch is followed by one epoch of
the plain loop, so both see the same machine load (which matters on a shared machine).

    python benchmarks/bench_finetune.py ../shared/data/hymenoptera --epochs 3

Settings (both loops): tf_efficientnet_lite0 with its bundled ImageNet weights, a new
linear head, everything up to and including --freeze-to frozen (BatchNorm in eval mode),
AdamW (weight decay 0.01, not on norms and biases), learning rates --lr for the head and
--layer-decay per stage below it (timm's coarse group matcher), one warm-up epoch then
cosine, label smoothing 0.1, --augment (timm's training transform), batch size 32,
validation every epoch. The plain loop decodes with PIL, tlearn with its own loader.

Variants: tlearn with --cache off (the same work as the plain loop), with its default
cache (validation's frozen prefix computed once), and with --augment flip (the training
images' frozen prefix cached too). Prints per-epoch times, then a table of medians, the
median ratio of paired epochs, the one-off setup (caches) and best validation accuracy.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ----------------------------------------------------------------------------- plain loop


def plain_loop(
    data: Path,
    epochs: int,
    freeze_to: str,
    lr: float,
    decay: float,
    augment: str,
    batch_size: int,
    workers: int,
    seed: int,
):
    """What a user would write with timm and torchvision, no tlearn code involved except
    fetching the same bundled weights file. A generator: one epoch per next()."""
    import timm
    from PIL import Image
    from timm.models._manipulate import group_with_matcher
    from torch.utils.data import DataLoader, Dataset

    from tlearn.core.spec import bundled_weights_file

    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = torch.load(
        str(bundled_weights_file("tf_efficientnet_lite0")), map_location="cpu", weights_only=True
    )
    model.load_state_dict(dict(zip(model.state_dict().keys(), sd.values(), strict=True)))
    model.reset_classifier(2)
    model.drop_rate = 0.2  # the same dropout before the classifier as tlearn's linear head

    cfg = timm.data.resolve_data_config({}, model=model)
    train_tf = (
        timm.data.create_transform(
            **{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std")},
            is_training=True,
            scale=(0.25, 1.0) if augment == "light" else None,
            color_jitter=0.4 if augment == "standard" else None,
        )
        if augment in ("light", "standard")
        else timm.data.create_transform(**cfg)
    )
    eval_tf = timm.data.create_transform(**cfg)

    class Folder(Dataset):
        def __init__(self, root, tf):
            self.classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
            self.items = [
                (p, i)
                for i, c in enumerate(self.classes)
                for p in sorted((Path(root) / c).iterdir())
            ]
            self.tf = tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            p, y = self.items[i]
            return self.tf(Image.open(p).convert("RGB")), y

    train = DataLoader(
        Folder(data / "train", train_tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=False,
    )
    val = DataLoader(Folder(data / "val", eval_tf), batch_size=batch_size, num_workers=workers)

    # Freeze up to and including freeze_to; layer-wise rates over the coarse groups.
    names = [n for n, _ in model.named_parameters()]
    stop = max(i for i, n in enumerate(names) if n.startswith(freeze_to + "."))
    frozen = set(names[: stop + 1])
    ids = group_with_matcher(
        [(n, None) for n in names if not n.startswith("classifier.")],
        model.group_matcher(coarse=True),
        reverse=True,
    )
    top = max(ids.values())
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
            continue
        scale = 1.0 if n.startswith("classifier.") else decay ** (top + 1 - ids[n])
        wd = 0.0 if p.ndim <= 1 or n.endswith(".bias") else 0.01
        groups.setdefault((scale, wd), []).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": ps, "lr": lr * s, "base": lr * s, "weight_decay": wd}
            for (s, wd), ps in groups.items()
        ]
    )
    frozen_modules = [
        m
        for m in model.modules()
        if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())
    ]
    steps, warm = epochs * len(train), len(train)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step = 0
    yield None  # set up: the first next() builds everything, outside the epoch timings
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for m in frozen_modules:
            m.eval()
        for x, y in train:
            f = (
                (step + 1) / (warm + 1)
                if step < warm
                else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = g["base"] * f
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        correct = n = 0
        with torch.inference_mode():
            for x, y in val:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
        yield {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, "val_acc": correct / n}


# ----------------------------------------------------------------------------- tlearn


def paired_run(
    data: Path, plain, *, epochs, freeze_to, lr, decay, augment, batch_size, workers, seed, cache
) -> tuple[list[dict], list[dict], float]:
    """tlearn's fit_nn, with one epoch of the plain loop run right after each of its epochs
    (from the epoch_end callback, outside tlearn's timing), so that every pair of epochs
    sees the same machine load."""
    from tlearn.core.options import RunOptions
    from tlearn.train.api import fit_nn
    from tlearn.train.options import TrainOptions

    starts: list[float] = []
    ends: list[float] = []
    plain_rows: list[dict] = []

    def events(name, d):
        if name == "epoch_start":
            starts.append(time.perf_counter())
        elif name == "epoch_end":
            ends.append(time.perf_counter())
            plain_rows.append(next(plain))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = fit_nn(
            data,
            Path(tmp) / "m",
            options=TrainOptions(
                head="linear",
                freeze_to=freeze_to,
                layer_decay=decay,
                lr=lr,
                augment=augment,
                epochs=epochs,
                cache=cache,
            ),
            seed=seed,
            run=RunOptions(batch_size=batch_size, workers=workers),
            events=events,
        )
    total = time.perf_counter() - t0
    # a tlearn epoch: from its start to its end (train, validation, checkpoint)
    per = [e - s for s, e in zip(starts, ends, strict=True)]
    rows = [
        {"epoch": h["epoch"], "seconds": sec, "val_acc": h["val_acc"]}
        for h, sec in zip(res.history, per, strict=True)
    ]
    setup = total - sum(per) - sum(r["seconds"] for r in plain_rows)
    return rows, plain_rows, setup


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("data", type=Path, help="folder with train/ and val/ class folders")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--freeze-to", default="blocks.4")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layer-decay", type=float, default=0.5)
    ap.add_argument("--augment", default="light", choices=["none", "light", "standard"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 2)))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    common = dict(
        epochs=a.epochs,
        freeze_to=a.freeze_to,
        lr=a.lr,
        decay=a.layer_decay,
        batch_size=a.batch_size,
        workers=a.workers,
        seed=a.seed,
    )
    variants = {
        "tlearn --cache off": dict(augment=a.augment, cache="off"),
        "tlearn (default cache)": dict(augment=a.augment, cache="memory"),
        "tlearn --augment flip": dict(augment="flip", cache="memory"),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"epochs {a.epochs}, augment {a.augment} (plain loop always), freeze-to {a.freeze_to}, "
        f"layer-decay {a.layer_decay}, batch {a.batch_size}, workers {a.workers}",
        flush=True,
    )
    table = []
    for name, v in variants.items():
        plain = plain_loop(a.data, augment=a.augment, **common)
        next(plain)
        rows, plain_rows, setup = paired_run(a.data, plain, **v, **common)
        ratios = [r["seconds"] / p["seconds"] for r, p in zip(rows, plain_rows, strict=True)]
        print(
            f"{name}: "
            + ", ".join(
                f"{r['seconds']:.1f}s vs {p['seconds']:.1f}s"
                for r, p in zip(rows, plain_rows, strict=True)
            )
            + f" (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        table.append(
            (
                name,
                statistics.median(r["seconds"] for r in rows),
                statistics.median(p["seconds"] for p in plain_rows),
                statistics.median(ratios),
                setup,
                max(r["val_acc"] for r in rows),
                max(p["val_acc"] for p in plain_rows),
            )
        )
    print(
        f"\n{'variant':24} {'tlearn s/ep':>11} {'plain s/ep':>10} {'ratio':>6} {'setup s':>8} "
        f"{'acc tlearn':>10} {'acc plain':>9}"
    )
    for name, t, p, ratio, setup, acc_t, acc_p in table:
        print(f"{name:24} {t:11.1f} {p:10.1f} {ratio:6.2f} {setup:8.1f} {acc_t:10.3f} {acc_p:9.3f}")
    print("(medians over epochs; ratio = median of tlearn epoch / the plain epoch run right after)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
