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
from tlearn.train.build import Setup
from tlearn.train.frozen import Caches

Validation = tuple[float, float, np.ndarray, np.ndarray]  # loss, accuracy, labels, predictions


def _cached_logits(setup: Setup, caches: Caches):
    """(logits, labels) per batch of the validation cache."""
    cache, net, bs = caches.val, setup.net, setup.run.batch_size
    for i in range(0, len(cache), bs):
        rows = torch.arange(i, min(i + bs, len(cache)))
        x = cache.get(rows).to(setup.device).float()
        y = setup.y_val[torch.as_tensor(cache.indices[rows.numpy()])]
        with setup.amp.autocast():
            if caches.val_level == "features":
                logits = net.head(x)
            else:
                logits = net.forward_from_prefix(x)
        yield logits, y


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
            logits = setup.net(x.to(setup.device))
        yield logits, y


def _gathered(dist, losses: list, ys: list, preds: list) -> tuple[list, list, list]:
    """Every shard's batch sums and predictions, in input order, on every rank."""
    mine = {
        "loss": [float(v) for v in losses],
        "y": torch.cat(ys).tolist() if ys else [],
        "p": torch.cat(preds).tolist() if preds else [],
    }
    infos = dist.gather(mine)
    losses = [torch.tensor(v, dtype=torch.float32) for i in infos for v in i["loss"]]
    ys = [torch.tensor(i["y"], dtype=torch.long) for i in infos if i["y"]]
    preds = [torch.tensor(i["p"], dtype=torch.long) for i in infos if i["p"]]
    return losses, ys, preds


def validate(setup: Setup, caches: Caches) -> Validation | None:
    if setup.val_set is None or len(setup.val_set) == 0:
        return None
    setup.net.eval()
    losses, preds, ys = [], [], []
    with torch.inference_mode():
        batches = _cached_logits(setup, caches) if caches.val is not None else _image_logits(setup)
        for logits, y in batches:
            losses.append(nn.functional.cross_entropy(logits.float().cpu(), y, reduction="sum"))
            preds.append(logits.argmax(1).cpu())
            ys.append(y)
    if setup.dist is not None:
        losses, ys, preds = _gathered(setup.dist, losses, ys, preds)
    if not ys:
        return None
    y = torch.cat(ys)
    p = torch.cat(preds)
    loss = float(torch.stack(losses).sum()) / len(y)
    return loss, float((p == y).float().mean()), y.numpy(), p.numpy()
