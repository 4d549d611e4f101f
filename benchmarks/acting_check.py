"""Calibration, prediction sets and "unknown" on real photos (docs/benchmarks.md).

Fits a model on TRAIN with the defaults (or --head linear), evaluates it on VAL with
--coverage, compares its calibrated probabilities with the uncalibrated baseline of the
same run (softmax of the raw decision values, temperature 1), and, with --ood DIR,
reports how many images of an unrelated set the model flags as unknown.

    python benchmarks/acting_check.py ../shared/data/hymenoptera/train \\
        ../shared/data/hymenoptera/val --ood sample_data/roads
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from tlearn.heads.calibration import softmax
from tlearn.jobs.evaluate import evaluate
from tlearn.jobs.fit import fit
from tlearn.jobs.predict import predict
from tlearn.report.calibration import multiclass_calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("val")
    ap.add_argument("--ood", help="a folder of images unlike the training images")
    ap.add_argument("--head", default="svm", choices=["svm", "logreg", "linear"])
    ap.add_argument("--coverage", type=float, default=0.9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        if args.head == "linear":
            # the neural head trains with torch: only this branch needs it
            from tlearn.train.api import fit_nn
            from tlearn.train.options import TrainOptions

            fit_nn(args.train, model, options=TrainOptions(head="linear"), val_split=0.2)
        else:
            fit(args.train, model, head=args.head)
        res = evaluate(model, args.val, coverage=args.coverage)
        m = res.metrics
        # the same run's baseline: the raw decision values' softmax (temperature 1)
        cfg = json.loads((model / "config.json").read_text())
        temperature = cfg["calibration"]["probability"]["temperature"]
        raw = np.log(np.clip(res.probabilities, 1e-300, None)) * temperature
        base = multiclass_calibration(softmax(raw), res.y_true)
        out = {
            "head": args.head,
            "images": m["n_images"],
            "accuracy": round(m["accuracy"], 4),
            "temperature": round(temperature, 4),
            "ece": round(m["ece"], 4),
            "ece_uncalibrated": round(base["ece"], 4),
            "nll": round(m["nll"], 4),
            "nll_uncalibrated": round(base["nll"], 4),
            "brier": round(m["brier"], 4),
            "coverage_target": args.coverage,
            "coverage": round(m["coverage"], 4),
            "mean_set_size": round(m["mean_set_size"], 3),
            "val_flagged_unknown": f"{m['ood_flagged']}/{m['n_images']}",
        }
        if args.ood:
            preds = predict(model, [args.ood]).predictions
            flagged = sum(bool(p.unknown) for p in preds)
            out["ood_flagged_unknown"] = f"{flagged}/{len(preds)}"
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
