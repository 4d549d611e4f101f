"""Time per epoch of tlearn's fine-tuning against a plain hand-written timm training loop
with the same settings, measured in one run (alternating rounds, so both see the same
machine load), plus tlearn with its caches on.

    python benchmarks/bench_finetune.py ../shared/data/hymenoptera --epochs 3 --rounds 2

Settings (both loops): tf_efficientnet_lite0 with its bundled ImageNet weights, a new
linear head, everything up to and including --freeze-to frozen (BatchNorm in eval mode),
AdamW (weight decay 0.01, not on norms and biases), learning rates --lr for the head and
--layer-decay per stage below it (timm's coarse group matcher), one warm-up epoch then
cosine, label smoothing 0.1, --augment (timm's training transform), batch size 32,
validation every epoch. The plain loop decodes with PIL, tlearn with its own loader.

Prints one table: variant, fastest and median seconds per epoch (train + validation, and
tlearn's checkpoint), the ratio of fastest epochs to the plain loop's, the one-off setup
(caches) and the best validation accuracy.
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
) -> list[dict]:
    """What a user would write with timm and torchvision, no tlearn code involved except
    fetching the same bundled weights file."""
    import timm
    from PIL import Image
    from timm.models._manipulate import group_with_matcher
    from torch.utils.data import DataLoader, Dataset

    from tlearn.backbone import bundled_weights_file

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
    out, step = [], 0
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
        out.append(
            {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, "val_acc": correct / n}
        )
    return out


# ----------------------------------------------------------------------------- tlearn


def tlearn_run(
    data: Path,
    epochs: int,
    freeze_to: str,
    lr: float,
    decay: float,
    augment: str,
    batch_size: int,
    workers: int,
    seed: int,
    cache: str,
) -> tuple[list[dict], float]:
    from tlearn.pipeline import RunOptions
    from tlearn.train import TrainOptions, fit_nn

    marks: list[float] = []

    def events(name, d):
        if name in ("epoch_start", "epoch_end"):
            marks.append(time.perf_counter())

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
    # epoch k: from its start to its end (train, validation, checkpoint)
    per = [marks[2 * i + 1] - marks[2 * i] for i in range(len(res.history))]
    rows = [
        {"epoch": h["epoch"], "seconds": s, "val_acc": h["val_acc"]}
        for h, s in zip(res.history, per, strict=True)
    ]
    return rows, total - sum(per)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("data", type=Path, help="folder with train/ and val/ class folders")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternating repetitions")
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
        "plain timm loop": lambda: (plain_loop(a.data, augment=a.augment, **common), 0.0),
        "tlearn --cache off": lambda: tlearn_run(a.data, augment=a.augment, cache="off", **common),
        "tlearn (default cache)": lambda: tlearn_run(
            a.data, augment=a.augment, cache="memory", **common
        ),
        "tlearn --augment flip": lambda: tlearn_run(
            a.data, augment="flip", cache="memory", **common
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    setup: dict[str, list[float]] = {k: [] for k in variants}
    accs: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for name, fn in variants.items():
            rows, once = fn()
            times[name] += [row["seconds"] for row in rows]
            setup[name].append(once)
            accs[name].append(max(row["val_acc"] for row in rows))
            print(
                f"round {r + 1} {name}: "
                + ", ".join(f"{row['seconds']:.1f}s" for row in rows)
                + f" (setup {once:.1f}s, best val acc {accs[name][-1]:.3f})",
                flush=True,
            )
    # Other processes on the machine inflate some epochs a lot; the fastest epoch of each
    # variant is the steadiest estimate, the median is shown too.
    base = min(times["plain timm loop"])
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, epochs {a.epochs} x rounds {a.rounds}, "
        f"augment {a.augment}, freeze-to {a.freeze_to}, layer-decay {a.layer_decay}"
    )
    print(
        f"{'variant':26} {'min s/ep':>9} {'median':>7} {'ratio':>6} {'setup s':>8} {'best acc':>9}"
    )
    for name in variants:
        best, med = min(times[name]), statistics.median(times[name])
        print(
            f"{name:26} {best:9.1f} {med:7.1f} {best / base:6.2f} "
            f"{min(setup[name]):8.1f} {max(accs[name]):9.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
