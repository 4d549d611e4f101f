"""Accuracy of tlearn's default SVM path against a plain hand-written script.

The plain script is what a user writes without tlearn: timm's tf_efficientnet_lite0 with
the same bundled weights, timm's eval transform, pooled penultimate features, then
StandardScaler + LinearSVC(C=1). tlearn runs with its defaults:
`tlearn fit DATA/train -o m && tlearn evaluate m DATA/val --json`.

    python benchmarks/svm_accuracy.py ../shared/data/hymenoptera

Both run in the same process run, on the same images; prints both accuracies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image


def plain_features(model, transform, folder: Path):
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    X, y = [], []
    for k, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).iterdir() if p.is_file())
        for i in range(0, len(files), 32):
            batch = []
            for f in files[i : i + 32]:
                try:
                    batch.append(transform(Image.open(f).convert("RGB")))
                except Exception:
                    continue
            with torch.no_grad():
                X.append(model.forward_head(model.forward_features(torch.stack(batch)), True))
            y += [k] * len(batch)
    return torch.cat(X).numpy(), np.array(y)


def plain_script(data: Path) -> float:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from tlearn.backbone.weights import load_backbone

    model = load_backbone("tf_efficientnet_lite0", "auto").model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    Xtr, ytr = plain_features(model, transform, data / "train")
    Xva, yva = plain_features(model, transform, data / "val")
    clf = make_pipeline(StandardScaler(), LinearSVC(C=1.0)).fit(Xtr, ytr)
    return float((clf.predict(Xva) == yva).mean())


def tlearn_defaults(data: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "m"
        exe = [sys.executable, "-m", "tlearn"]
        subprocess.run([*exe, "fit", str(data / "train"), "-o", str(m), "-q"], check=True)
        out = subprocess.run(
            [*exe, "evaluate", str(m), str(data / "val"), "--json", "-q"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return float(json.loads(out)["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="folder with train/ and val/ class folders")
    args = ap.parse_args()
    t0 = time.perf_counter()
    plain = plain_script(args.data)
    t1 = time.perf_counter()
    ours = tlearn_defaults(args.data)
    t2 = time.perf_counter()
    print(f"plain script (LinearSVC C=1):  val accuracy {plain:.4f}  ({t1 - t0:.0f}s)")
    print(f"tlearn defaults (C auto):      val accuracy {ours:.4f}  ({t2 - t1:.0f}s)")
    print(f"difference: {100 * (ours - plain):+.1f} points")


if __name__ == "__main__":
    main()
