"""Does `tlearn audit` find planted problems in real photos?

Copies DATA (DATA/train + DATA/val class folders) to a temporary folder, then plants:
- near duplicates across train and val: `--dups` images (half from train into val, half
  from val into train, into the same class), each slightly cropped (2-4% per side),
  resized to 90% and re-encoded as JPEG quality 70;
- label errors: `--flip` of the other images (default 5%) moved to another class folder.
Runs `tlearn audit COPY -o REPORT --json` twice with a fresh feature cache and reports:
- duplicate pairs: recall and precision against the planted pairs (a listed pair that
  was not planted counts against precision, also when it is a real duplicate in DATA);
- label errors: how many flipped images are among the first 2 x (number flipped) rows
  of label_issues.csv;
- the second run's engine summary (it must compute no features).

    python benchmarks/audit_check.py ../shared/data/hymenoptera [--threshold 0.83]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, child_env, list_images
from PIL import Image


def plant(data: Path, copy: Path, n_dups: int, flip: float, seed: int):
    """The corrupted copy; returns (planted pairs as resolved path pairs, flipped paths)."""
    shutil.copytree(data, copy)
    rng = random.Random(seed)
    splits = {s: list_images(copy / s) for s in ("train", "val")}
    sources = rng.sample(splits["train"], n_dups // 2) + rng.sample(
        splits["val"], n_dups - n_dups // 2
    )
    pairs = []
    for src in map(Path, sources):
        other = "val" if src.parents[1].name == "train" else "train"
        dst = copy / other / src.parent.name / f"planted_{src.stem}.jpg"
        img = Image.open(src).convert("RGB")
        w, h = img.size
        cx, cy = int(w * rng.uniform(0.02, 0.04)), int(h * rng.uniform(0.02, 0.04))
        img = img.crop((cx, cy, w - cx, h - cy))
        img = img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.BICUBIC)
        img.save(dst, quality=70)
        pairs.append(frozenset((str(src.resolve()), str(dst.resolve()))))
    used = {p for pair in pairs for p in pair}
    candidates = [p for p in list_images(copy) if str(Path(p).resolve()) not in used]
    flipped = []
    for p in rng.sample(candidates, round(flip * len(list_images(copy)))):
        p = Path(p)
        classes = sorted(d.name for d in p.parents[1].iterdir() if d.is_dir())
        new = rng.choice([c for c in classes if c != p.parent.name])
        dst = p.parents[1] / new / f"flipped_{p.name}"
        p.rename(dst)
        flipped.append(str(dst.resolve()))
    return pairs, flipped


def run_audit(copy: Path, report: Path, threshold: float, cache: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "tlearn", "audit", str(copy), "-o", str(report), "--json"]
    cmd += ["--threshold", str(threshold), "-q"]
    t0 = time.perf_counter()
    env = child_env(TLEARN_CACHE_DIR=str(cache))  # a fresh cache: the first run computes
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"audit failed: {p.stderr}")
    return json.loads(p.stdout), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--dups", type=int, default=20)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.83)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlearn-audit-") as tmp:
        copy, report = Path(tmp) / "data", Path(tmp) / "report"
        pairs, flipped = plant(args.data, copy, args.dups, args.flip, args.seed)
        cache = Path(tmp) / "cache"
        first, t1 = run_audit(copy, report, args.threshold, cache)
        second, t2 = run_audit(copy, report, args.threshold, cache)
        with open(report / "duplicates.csv", newline="", encoding="utf-8") as f:
            found = [
                frozenset((str(Path(r["path_a"]).resolve()), str(Path(r["path_b"]).resolve())))
                for r in csv.DictReader(f)
            ]
        with open(report / "label_issues.csv", newline="", encoding="utf-8") as f:
            ranked = [str(Path(r["path"]).resolve()) for r in csv.DictReader(f)]
    hits = len(set(found) & set(pairs))
    top = ranked[: 2 * len(flipped)]
    caught = sum(p in set(flipped) for p in top)
    result = {
        "images": first["n_images"],
        "planted_pairs": len(pairs),
        "listed_pairs": len(found),
        "duplicate_recall": hits / len(pairs),
        "duplicate_precision": hits / len(found) if found else 1.0,
        "flipped": len(flipped),
        "label_issues_listed": len(ranked),
        "flagged_by_confident_learning": first["label_issues"]["confident_learning"],
        "flipped_in_first_2x": caught,
        "flipped_in_first_2x_share": caught / len(flipped) if flipped else 1.0,
        "threshold": args.threshold,
        "first_run": {"seconds": round(t1, 1), "engine": first["engine"]},
        "second_run": {"seconds": round(t2, 1), "engine": second["engine"]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
