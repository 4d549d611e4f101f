"""`tlearn extract` on CPU: this checkout against another commit, in ONE run (A/B).

    python benchmarks/extract_ab.py ../shared/data/hymenoptera --base HEAD~1 [--rounds 7]

The base commit is exported (git archive) to a temporary folder and run from there with
the same interpreter. Each round runs base and new alternately (ABBA order), each as its
own process on the default options, in the state of any repeated use: the cut's graph
exported and cached (a warm, torch-free run) but no features of these images cached, so
every image is decoded and computed. Reported: the whole command's wall seconds and CPU
seconds (user + sys of the process tree), median and best over rounds, and the median
of the per-round ratios new / base. With --formats, the new checkout also writes the
other table formats in the same rounds (the base only knows CSV).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


def _export(ref: str, dest: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(bl.REPO), "archive", ref], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _run(code: Path, data: str, out: Path, cache: Path) -> dict:
    shutil.rmtree(cache / "features", ignore_errors=True)  # graph kept, features cold
    cmd = [sys.executable, "-m", "tlearn", "extract", data, "-o", str(out), "-q"]
    env = {**bl.child_env(TLEARN_CACHE_DIR=str(cache)), "PYTHONPATH": str(code)}
    return bl.check(bl.run_measured(cmd, env=env, cwd=code), f"extract ({code})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--base", required=True, help="git ref of the baseline")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--formats", default="", help="also time these formats, e.g. parquet,npy")
    args = ap.parse_args()
    bl.print_machine(bl.machine())
    n = len(bl.list_images(args.data))
    print(f"data: {args.data} ({n} images); base {args.base}; {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="tlearn-ab-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "base").mkdir()
        _export(args.base, tmp / "base")
        codes = {"base": tmp / "base", "new": bl.REPO}
        runs = [("base", "csv"), ("new", "csv")]
        runs += [("new", f) for f in args.formats.split(",") if f]
        for name, fmt in runs:  # export the graph into each cache: the warm state
            _run(codes[name], args.data, tmp / f"warmup.{fmt}", tmp / f"cache-{name}-{fmt}")
        times: dict = {run: [] for run in runs}
        for r in range(args.rounds):
            order = runs if r % 2 == 0 else runs[::-1]
            for name, fmt in order:
                res = _run(codes[name], args.data, tmp / f"out.{fmt}", tmp / f"cache-{name}-{fmt}")
                times[(name, fmt)].append((res["wall"], res["cpu_s"]))
            line = "  ".join(f"{k[0]} {k[1]} {v[-1][0]:.2f}s" for k, v in times.items())
            print(f"round {r + 1}: {line}", flush=True)
    base = times[("base", "csv")]
    print()
    for (name, fmt), t in times.items():
        walls, cpus = [w for w, _ in t], [c for _, c in t]
        ratio = bl.median([w / b[0] for (w, _), b in zip(t, base, strict=True)])
        cpu_ratio = bl.median([c / b[1] for (_, c), b in zip(t, base, strict=True)])
        print(
            f"{name:4s} -o .{fmt:8s} wall median {bl.median(walls):.2f}s best {min(walls):.2f}s "
            f"({n / bl.median(walls):.0f} img/s whole command); CPU median {bl.median(cpus):.2f}s"
            f"; vs base csv: wall {ratio:.3f}x, CPU {cpu_ratio:.3f}x (median of round ratios)"
        )


if __name__ == "__main__":
    main()
