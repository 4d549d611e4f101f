"""Each `fit --preset` on real photos: fit on TRAIN, evaluate on the held-out VAL (never
seen by the fit: best carves its early-stopping split from TRAIN), wall time of the fit
(docs/benchmarks.md).

    python benchmarks/presets_check.py ../shared/data/hymenoptera/train \\
        ../shared/data/hymenoptera/val

Every fit runs in its own process with a fresh feature cache (a cold first run), one
after the other; the load average before and after each is printed, since the machine
may be shared. Extra fit options after --: e.g. -- --time-limit 10m.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tlearn(args: list[str], env: dict, quiet: bool = True) -> dict:
    cmd = [sys.executable, "-m", "tlearn", *args, "--json", *(["-q"] if quiet else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    for line in done.stderr.splitlines():  # the time estimates and the stopping reasons
        if line.startswith(("estimate:", "stopping", "--layer auto:", "unfreezing", "compared")):
            print("   ", line)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("val")
    ap.add_argument("--presets", default="fast,balanced,best")
    ap.add_argument("extra", nargs="*", help="more fit options (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            env = {**os.environ, "TLEARN_CACHE_DIR": str(Path(tmp) / f"cache-{name}")}
            model = Path(tmp) / f"m-{name}"
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            fit = ["fit", args.train, "-o", str(model), "--preset", name, *args.extra]
            fitted = tlearn(fit, env, quiet=False)
            seconds = time.perf_counter() - t0
            load1 = os.getloadavg()[0]
            ev = tlearn(["evaluate", str(model), args.val], env)
            config = json.loads((model / "config.json").read_text())
            train = config.get("train", {})
            what = config["cut"]["model"] + " at " + ",".join(config["cut"]["layers"])
            if config.get("backbone", {}).get("trained"):
                what += f", {train.get('epochs_run')} epochs (best {train.get('best_epoch')})"
                planned = (train.get("time_limit") or {}).get("epochs_planned")
                if planned:
                    what += f" of {planned} planned: shortened to fit the time limit"
                if train.get("kept_phase"):
                    what += f", kept: {train['kept_phase']}"
            if config.get("layer_auto"):
                what += f" (cut searched: {config['layer_auto'].get('choice', '')[:40]})"
            if config.get("tta"):
                what += f", TTA {config['tta']['chosen']}"
            if config.get("compared"):
                c = config["compared"]
                acc = c["val_accuracy"]
                what += (
                    f"; --compare-svm on {c['n_val']} val images: network {acc['network']:.3f},"
                    f" SVM {acc['svm']:.3f}, kept {c['kept']}"
                )
            acc = ev.get("accuracy", ev.get("metrics", {}).get("accuracy"))
            rows.append((name, what, acc, seconds, load0, load1, fitted.get("time_limited")))
            print(f"{name}: accuracy {acc} fit {seconds:.0f}s load {load0:.1f}->{load1:.1f}")
    print("\n| preset | what it fitted | val accuracy | fit wall time | load avg before/after |")
    print("|---|---|---|---|---|")
    for name, what, acc, seconds, l0, l1, limited in rows:
        lim = " (time limit)" if limited else ""
        print(f"| {name} | {what} | {acc:.4f} | {seconds:.0f} s{lim} | {l0:.1f} / {l1:.1f} |")


if __name__ == "__main__":
    main()
