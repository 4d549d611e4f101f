"""Does an exported model give tlearn's predictions, with nothing but ONNX Runtime?

For each head (`--heads`, default svm and logreg): `tlearn fit DATA/train`, then
`tlearn export` (fp32, checked on DATA/val), then on every DATA/val image compares
- docs/onnx_example.py (onnxruntime + numpy + Pillow, no tlearn import) with
  `tlearn predict MODEL_DIR`: top-1 class and every score (probabilities for logreg);
- `tlearn predict model.onnx` with `tlearn predict MODEL_DIR`;
then exports `--quantize int8` (calibrated on 32 DATA/train images, checked on DATA/val)
and reports its size against the fp32 file and its top-1 agreement with fp32.

    python benchmarks/export_check.py ../shared/data/hymenoptera
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchlib import REPO, child_env, list_images


def tlearn(*args) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "tlearn", *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
    )
    if p.returncode != 0:
        sys.exit(f"tlearn {' '.join(map(str, args))} failed: {p.stderr}")
    return p.stdout


def predictions(model, images: Path) -> dict[str, tuple[str, np.ndarray]]:
    doc = json.loads(tlearn("predict", model, images, "-f", "json", "--all-scores", "-q"))
    return {
        str(Path(r["path"]).resolve()): (r["prediction"], np.array(list(r["scores"].values())))
        for r in doc["predictions"]
    }


def example(onnx: Path, images: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    p = subprocess.run(
        [sys.executable, str(REPO / "docs" / "onnx_example.py"), str(onnx), *images],
        capture_output=True,
        text=True,
        check=True,
    )
    out = {}
    for line, path in zip(p.stdout.splitlines(), images, strict=True):  # one line per image
        label, *scores = line[len(path) + 1 :].split(" ")
        out[str(Path(path).resolve())] = (label, np.array(list(map(float, scores))))
    return out


def compare(ref: dict, got: dict) -> dict:
    common = sorted(set(ref) & set(got))
    return {
        "images": len(ref),
        "compared": len(common),
        "top1_agreement": sum(ref[p][0] == got[p][0] for p in common) / max(1, len(ref)),
        "max_abs_diff": max(float(np.abs(ref[p][1] - got[p][1]).max()) for p in common),
    }


def check_head(data: Path, head: str, tmp: Path) -> dict:
    model, fp32, int8 = tmp / f"m-{head}", tmp / f"{head}.onnx", tmp / f"{head}.int8.onnx"
    tlearn("fit", data / "train", "-o", model, "--head", head, "-q")
    val = data / "val"
    exp = json.loads(tlearn("export", model, "-o", fp32, "--check", val, "--json", "-q"))
    ref = predictions(model, val)
    result = {
        "score_kind": exp["score_kind"],
        "export_check_max_abs_diff": exp["check"]["max_abs_diff"],
        "example_script_vs_predict": compare(ref, example(fp32, list_images(val))),
        "predict_onnx_vs_predict": compare(ref, predictions(fp32, val)),
    }
    q = json.loads(
        tlearn(
            "export",
            model,
            "-o",
            int8,
            "--quantize",
            "int8",
            "--check",
            val,
            "--calibration",
            data / "train",
            "--json",
            "-q",
        )  # fmt: skip
    )["quantized"]
    result["int8"] = {
        "fp32_bytes": q["fp32_size"],
        "int8_bytes": int8.stat().st_size,
        "size_ratio": round(q["size_ratio"], 4),
        "top1_agreement_with_fp32": round(q["top1_agreement"], 4),
        "images": q["images"],
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a folder with train/ and val/ class folders")
    ap.add_argument("--heads", default="svm,logreg")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlearn-export-check-") as tmp:
        report = {h: check_head(args.data, h, Path(tmp)) for h in args.heads.split(",")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
