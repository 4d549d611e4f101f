"""A second `fit` on the same images with another C, against the first (cold cache).

    python benchmarks/cache_speed.py DATA [--C1 1 --C2 0.01]

DATA: class folders (or train/ + val/). With a fresh, empty TLEARN_CACHE_DIR, runs
`tlearn fit DATA --C C1`, then `tlearn fit DATA --C C2`, then `tlearn evaluate` on DATA
(all as separate processes, as a user would), and the same two fits again inside one
Python process (pipeline.fit, as a notebook or a script would). Prints the times and the
ratios first / second.

Target (issue 5): the second fit is >= 20x faster than the first.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

_SECONDS = re.compile(r" in ([\d.]+)s -> ")


def cli_fit(data: str, out: Path, C: str, cache: Path) -> dict:
    res = bl.check(
        bl.run_measured(
            bl.tlearn_cmd("fit", data, "-o", str(out), "--C", C, "-q", "--force"),
            env=bl.child_env(TLEARN_CACHE_DIR=str(cache)),
        ),
        "tlearn fit",
    )
    m = _SECONDS.search(res["stdout"])
    res["seconds"] = float(m.group(1)) if m else float("nan")
    return res


def in_process(data: str, tmp: Path, C1: str, C2: str) -> tuple[float, float]:
    import os

    os.environ["TLEARN_CACHE_DIR"] = str(tmp / "cache-inproc")
    from tlearn.jobs.fit import fit

    times = []
    for i, C in enumerate((C1, C2)):
        t = time.perf_counter()
        fit(data, tmp / f"inproc-{i}", C=C, force=True)
        times.append(time.perf_counter() - t)
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="class folders, or a folder with train/ and val/")
    ap.add_argument("--C1", default="1")
    ap.add_argument("--C2", default="0.01")
    args = ap.parse_args()
    bl.print_machine(bl.machine())
    n = len(bl.list_images(args.data))
    print(f"data: {args.data} ({n} images)")
    with tempfile.TemporaryDirectory(prefix="tlearn-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        first = cli_fit(args.data, tmp / "m1", args.C1, cache)
        second = cli_fit(args.data, tmp / "m2", args.C2, cache)
        val = Path(args.data) / "val"
        ev_data = str(val) if val.is_dir() else args.data  # images the fits already saw
        ev = bl.check(
            bl.run_measured(
                bl.tlearn_cmd("evaluate", str(tmp / "m2"), ev_data, "--json", "-q"),
                env=bl.child_env(TLEARN_CACHE_DIR=str(cache)),
            ),
            "tlearn evaluate",
        )
        t1, t2 = in_process(args.data, tmp, args.C1, args.C2)
    print()
    print("== second fit (other C, features from the cache) vs first fit (cold cache)")
    for key, label in (("wall", "CLI, whole command"), ("seconds", "CLI, after imports")):
        a, b = first[key], second[key]
        print(
            f"  {label:20s} first {a:6.2f}s  second {b:6.2f}s  -> {a / b:5.1f}x"
            f"   [target >= 20x: {'met' if a / b >= 20 else 'NOT met'}]"
        )
    print(
        f"  {'in one process':20s} first {t1:6.2f}s  second {t2:6.2f}s  -> {t1 / t2:5.1f}x"
        f"   [target >= 20x: {'met' if t1 / t2 >= 20 else 'NOT met'}]"
    )
    print(f"  evaluate on the same images (CLI, whole command, cached): {ev['wall']:.2f}s")


if __name__ == "__main__":
    main()
