"""Validation after every epoch (and of the kept weights at the end): loss, accuracy and
predictions over the validation images, from the frozen part's cache or from the images.
Under torchrun each rank scores its shard and every rank gets every shard's numbers, so
all take the same early-stopping decisions."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tlearn.data.pixels import resize_target
from tlearn.runtime.loader import image_loader
from tlearn.runtime.transforms import eval_transform
from tlearn.train.build import HeadOnly, Setup
from tlearn.train.frozen import Caches

Validation = tuple[float, float, np.ndarray, np.ndarray]  # loss, accuracy, labels, predictions
KEEP_FEATURES = 4096  # pooled features kept for the OOD bank (heads.ood caps its bank below)


def _cached_logits(setup: Setup, caches: Caches):
    """(logits, labels) per batch of the validation cache."""
    cache, net, bs = caches.val, setup.net, setup.run.batch_size
    for i in range(0, len(cache), bs):
        rows = torch.arange(i, min(i + bs, len(cache)))
        x = cache.get(rows).to(setup.device).float()
        y = setup.y_val[torch.as_tensor(cache.indices[rows.numpy()])]
        with setup.amp.autocast():
            feats = x if caches.val_level == "features" else net.features_from_prefix(x)
            logits = net.head(feats)
        yield logits, y, feats


def _image_logits(setup: Setup):
    """(logits, labels) per batch of validation images (this rank's shard under torchrun)."""
    data_config = setup.network.data_config
    start, stop = 0, len(setup.val_set)
    if setup.dist is not None:  # this rank's whole batches of the list
        start, stop = setup.dist.shard(stop, setup.run.batch_size)
    loader = image_loader(
        setup.val_set.paths[start:stop],
        eval_transform(data_config),
        batch_size=setup.run.batch_size,
        workers=setup.run.workers,
        min_size=resize_target(data_config),
        device=setup.device,
    )
    for idx, x, _bad in loader:
        if x is None:
            continue
        y = setup.y_val[torch.as_tensor(idx) + start]
        with setup.amp.autocast():
            feats = setup.net.features(x.to(setup.device))
            logits = setup.net.head(feats)
        yield logits, y, feats


def _gathered(dist, losses: list, ys: list, preds: list, logits: list):
    """Every shard's batch sums, predictions and logits, in input order, on every rank."""
    mine = {
        "loss": [float(v) for v in losses],
        "y": torch.cat(ys).tolist() if ys else [],
        "p": torch.cat(preds).tolist() if preds else [],
        "logits": torch.cat(logits).tolist() if logits else [],
    }
    infos = dist.gather(mine)
    losses = [torch.tensor(v, dtype=torch.float32) for i in infos for v in i["loss"]]
    ys = [torch.tensor(i["y"], dtype=torch.long) for i in infos if i["y"]]
    preds = [torch.tensor(i["p"], dtype=torch.long) for i in infos if i["p"]]
    logits = [torch.tensor(i["logits"], dtype=torch.float32) for i in infos if i["logits"]]
    return losses, ys, preds, logits


def validate(setup: Setup, caches: Caches, keep: dict | None = None) -> Validation | None:
    """Loss, accuracy, labels and predictions over the validation images. With `keep`
    (the final pass), also keep["logits"] (n, K) and keep["features"] (this rank's first
    KEEP_FEATURES pooled features) for calibration and the OOD bank (heads.posthoc)."""
    if setup.val_set is None or len(setup.val_set) == 0:
        return None
    setup.net.eval()
    losses, preds, ys, all_logits, feats = [], [], [], [], []
    kept = 0
    with torch.inference_mode():
        batches = _cached_logits(setup, caches) if caches.val is not None else _image_logits(setup)
        for logits, y, f in batches:
            logits = logits.float().cpu()
            losses.append(nn.functional.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1))
            ys.append(y)
            if keep is not None:
                all_logits.append(logits)
                if kept < KEEP_FEATURES:
                    feats.append(f.float().cpu()[: KEEP_FEATURES - kept])
                    kept += len(feats[-1])
    if setup.dist is not None:
        losses, ys, preds, all_logits = _gathered(setup.dist, losses, ys, preds, all_logits)
    if not ys:
        return None
    y = torch.cat(ys)
    p = torch.cat(preds)
    if keep is not None:
        keep["logits"] = torch.cat(all_logits).numpy() if all_logits else None
        keep["features"] = torch.cat(feats).numpy() if feats else None
    loss = float(torch.stack(losses).sum()) / len(y)
    return loss, float((p == y).float().mean()), y.numpy(), p.numpy()


def _flip_pairs(setup: Setup):
    """(logits, logits of the mirror image, labels) per batch of this rank's validation
    images: from the feature engine for a frozen backbone (its mirrored view, cached like
    the training flips), else from the images through the network."""
    paths = list(setup.val_set.paths)
    start, stop = 0, len(paths)
    if setup.dist is not None:
        start, stop = setup.dist.shard(stop, setup.run.batch_size)
    if isinstance(setup.net, HeadOnly) and setup.engine is not None:
        mine = paths[start:stop]
        plain = setup.engine.extract(mine, setup.run, stage="choose tta")
        mirror = setup.engine.mirrored().extract(mine, setup.run, stage="choose tta (mirror)")
        if len(plain.indices) != len(mirror.indices):
            return
        bs = setup.run.batch_size
        for i in range(0, len(plain.indices), bs):
            x = torch.from_numpy(np.ascontiguousarray(plain.X[i : i + bs])).to(setup.device)
            xf = torch.from_numpy(np.ascontiguousarray(mirror.X[i : i + bs])).to(setup.device)
            y = setup.y_val[torch.as_tensor(plain.indices[i : i + bs]) + start]
            yield setup.net.head(x.float()), setup.net.head(xf.float()), y
        return
    loader = image_loader(
        paths[start:stop],
        eval_transform(setup.network.data_config),
        batch_size=setup.run.batch_size,
        workers=setup.run.workers,
        min_size=resize_target(setup.network.data_config),
        device=setup.device,
    )
    for idx, x, _bad in loader:
        if x is None:
            continue
        x = x.to(setup.device)
        with setup.amp.autocast():
            yield setup.net(x), setup.net(x.flip(3)), setup.y_val[torch.as_tensor(idx) + start]


def flip_accuracies(setup: Setup) -> dict | None:
    """Validation accuracy without and with flip TTA (softmax probabilities averaged over
    the image and its mirror, as predict --tta flip does), and the images counted."""
    if setup.val_set is None or len(setup.val_set) == 0:
        return None
    setup.net.eval()
    right, n = {"none": 0, "flip": 0}, 0
    with torch.inference_mode():
        for logits, logits_flip, y in _flip_pairs(setup):
            p = logits.float().softmax(1).cpu()
            both = p + logits_flip.float().softmax(1).cpu()
            right["none"] += int((p.argmax(1) == y).sum())
            right["flip"] += int((both.argmax(1) == y).sum())
            n += len(y)
    if setup.dist is not None:
        parts = setup.dist.gather({"right": right, "n": n})
        right = {k: sum(p["right"][k] for p in parts) for k in right}
        n = sum(p["n"] for p in parts)
    if n == 0:
        return None
    return {"none": right["none"] / n, "flip": right["flip"] / n, "n": n}
