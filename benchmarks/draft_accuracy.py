"""JPEG draft decoding (reduced-scale decode of large JPEGs): accuracy and decode time.

    python benchmarks/draft_accuracy.py DATA

DATA has train/ and val/ class folders (e.g. ../shared/data/hymenoptera). Fits tlearn's
default SVM on train and measures validation accuracy with draft decoding on (the
default) and off, in one process, without the feature cache; then times decoding +
preprocessing of every image on one core, with and without draft.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="folder with train/ and val/")
    args = ap.parse_args()
    bl.print_machine(bl.machine())

    import torch
    from PIL import Image

    from tlearn.backbone.models import data_config_for
    from tlearn.backbone.weights import load_backbone
    from tlearn.core.options import RunOptions
    from tlearn.core.spec import DEFAULT_MODEL
    from tlearn.data.image import load_image
    from tlearn.data.pixels import resize_target
    from tlearn.jobs.fit import fit
    from tlearn.runtime.transforms import eval_transform

    paths = bl.list_images(args.data)
    cfg = data_config_for(load_backbone(DEFAULT_MODEL, "auto").model)
    target = resize_target(cfg)
    drafted = 0
    for p in paths:
        with Image.open(p) as im:
            if im.format == "JPEG" and min(im.size) >= 2 * target:
                drafted += 1
    print(f"data: {args.data} ({len(paths)} images; {drafted} JPEGs large enough to draft)")

    acc = {}
    with tempfile.TemporaryDirectory(prefix="tlearn-bench-") as tmp:
        for draft in (True, False):
            run = RunOptions(cache=False, draft=draft)
            res = fit(args.data / "train", Path(tmp) / f"m{draft}", val=args.data / "val", run=run)
            m = res.val_metrics
            acc[draft] = (m["accuracy"], round(m["accuracy"] * m["n_images"]), m["n_images"])

    torch.set_num_threads(1)
    tf = eval_transform(cfg)
    times = {}
    for draft in (True, False, True, False):
        t = time.process_time()
        for p in paths:
            tf(load_image(p, min_size=target if draft else None))
        times.setdefault(draft, []).append((time.process_time() - t) / len(paths) * 1000)
    print()
    for draft in (True, False):
        a, k, n = acc[draft]
        print(
            f"  draft {'on ' if draft else 'off'}: validation accuracy {a:.4f} ({k}/{n}); decode + "
            f"preprocess {min(times[draft]):.2f} ms/image on one core"
        )
    print(f"  accuracy change with draft: {100 * (acc[True][0] - acc[False][0]):+.2f} points")


if __name__ == "__main__":
    main()
