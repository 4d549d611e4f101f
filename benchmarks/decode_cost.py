"""CPU time per image of the decoding side, on one core, and what each choice saves.

    python benchmarks/decode_cost.py DATA [--reps 3]

For every image under DATA (best of --reps passes, time.process_time, one thread):
  read + sha256 (the feature cache key), JPEG decode with and without draft, and the
  eval transform done two ways: float32 (ToTensor + Normalize in the worker, as timm's
  transform does) and tlearn's pixel path (uint8 pixels; the runtime normalises). Also a
  crop-first resize (PIL resize with a box, only the centre crop) that was tried and
  dropped: it is faster but not bit-identical to timm's Resize + CenterCrop. Last, the
  cost of handing a batch to the main process (stack + copy into shared memory).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


def best_ms(fn, items, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t) / len(items) * 1000)
    return best


def box_resize_crop(img, size: int, crop: int):
    """Resize (shorter side -> size) + centre crop as one PIL resize of the crop's box."""
    from PIL import Image

    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), Image.Resampling.BICUBIC, box=box)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    bl.print_machine(bl.machine())

    import hashlib

    import numpy as np
    import torch

    from tlearn.backbone.models import data_config_for
    from tlearn.backbone.weights import load_backbone
    from tlearn.core.spec import DEFAULT_MODEL
    from tlearn.data.image import load_image
    from tlearn.data.pixels import resize_target
    from tlearn.runtime.transforms import eval_transform, split_eval_transform

    torch.set_num_threads(1)
    cfg = data_config_for(load_backbone(DEFAULT_MODEL, "auto").model)
    paths = bl.list_images(args.data)
    blobs = [Path(p).read_bytes() for p in paths]
    items = list(zip(paths, blobs, strict=True))
    target = resize_target(cfg)
    float_tf = eval_transform(cfg)
    pixel_tf = split_eval_transform(cfg)[0]
    imgs = [load_image(p, min_size=target, content=b) for p, b in items]
    print(f"data: {args.data} ({len(paths)} images), one core, best of {args.reps}")

    rows = [
        ("read + sha256 (cache key)", lambda pb: hashlib.sha256(Path(pb[0]).read_bytes()).digest()),
        ("decode, no draft", lambda pb: load_image(pb[0], content=pb[1])),
        ("decode, draft (tlearn)", lambda pb: load_image(pb[0], min_size=target, content=pb[1])),
    ]
    for label, fn in rows:
        print(f"  {label:44s} {best_ms(fn, items, args.reps):6.2f} ms/image")
    transforms = [
        ("transform to float32 (timm's, in the worker)", lambda im: float_tf(im)),
        ("transform to uint8 pixels (tlearn)", lambda im: pixel_tf(im)),
        ("crop-first box resize to uint8 (dropped)", lambda im: np.asarray(box_resize_crop(
            im, target, cfg["input_size"][1]))),
    ]  # fmt: skip
    for label, fn in transforms:
        print(f"  {label:44s} {best_ms(fn, imgs, args.reps):6.2f} ms/image")
    # How a worker hands each batch of 32 to the main process: torch's DataLoader puts
    # float32 tensors in shared memory (torch runtime); tlearn.decode pickles uint8 pixels
    # through a pipe (ONNX Runtime on CPU). Timed: building + pickling + unpickling.
    import pickle

    floats = [float_tf(im) for im in imgs[:32]]
    pixels = [pixel_tf(im) for im in imgs[:32]]
    ms = best_ms(lambda b: torch.stack(b).share_memory_(), [floats] * 10, args.reps) / 32
    print(f"  {'batch to shared memory, float32 (DataLoader)':44s} {ms:6.2f} ms/image")
    ms = best_ms(lambda b: pickle.loads(pickle.dumps(np.stack(b))), [pixels] * 10, args.reps)
    print(f"  {'batch pickled, uint8 pixels (tlearn.decode)':44s} {ms / 32:6.2f} ms/image")
    differ, worst = 0, 0
    for im in imgs:
        a = np.asarray(pixel_tf(im)).astype(int)
        b = np.asarray(box_resize_crop(im, target, cfg["input_size"][1])).astype(int)
        d = np.abs(a - b)
        differ += int((d > 0).sum())
        worst = max(worst, int(d.max()))
    total = len(imgs) * np.prod(pixel_tf(imgs[0]).shape)
    print(
        f"  crop-first vs timm's Resize + CenterCrop: {100 * differ / total:.2f}% of pixel "
        f"values differ, by up to {worst} levels (so it was not adopted)"
    )


if __name__ == "__main__":
    main()
