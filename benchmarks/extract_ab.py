"""`tlearn extract` on CPU: this checkout against another commit, in ONE run (A/B).

    python benchmarks/extract_ab.py ../shared/data/hymenoptera --base HEAD~1 [--rounds 7]

The base commit is exported (git archive) to a temporary folder and run from there with
the same interpreter. Each round runs base and new alternately (ABBA order), each as its
own process on the default options, in the state of any repeated use: the cut's graph
exported and cached (a warm, torch-free run) but no features of these images cached, so
every image is decoded and computed. Reported: the whole command's wall seconds, the
job's own seconds after imports (what `extract` prints: "wrote N rows ... in X.Xs") and
CPU seconds (user + sys of the process tree), median and best over rounds, and the
median of the per-round ratios new / base (CPU seconds are the steadiest figure when
other work shares the machine). With --formats, the new checkout also writes the
other table formats in the same rounds (the base only knows CSV).
"""

from __future__ import annotations

import argparse
import json
import re
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
    cmd = [sys.executable, "-m", "tlearn", "extract", data, "-o", str(out)]
    env = {**bl.child_env(TLEARN_CACHE_DIR=str(cache)), "PYTHONPATH": str(code)}
    res = bl.check(bl.run_measured(cmd, env=env, cwd=code), f"extract ({code})")
    m = re.search(r"features to .* in ([\d.]+)s", res["stderr"])
    res["job"] = float(m.group(1)) if m else float("nan")
    return res


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
                times[(name, fmt)].append((res["wall"], res["cpu_s"], res["job"]))
            line = "  ".join(f"{k[0]} {k[1]} {v[-1][0]:.2f}s" for k, v in times.items())
            print(f"round {r + 1}: {line}", flush=True)
    base = times[("base", "csv")]
    print()
    summary = {}
    for (name, fmt), t in times.items():
        walls, cpus, jobs = ([v[k] for v in t] for k in range(3))

        def ratio(k, t=t):
            return bl.median([v[k] / b[k] for v, b in zip(t, base, strict=True)])

        print(
            f"{name:4s} -o .{fmt:8s} wall median {bl.median(walls):.2f}s best {min(walls):.2f}s; "
            f"job median {bl.median(jobs):.1f}s best {min(jobs):.1f}s; CPU median "
            f"{bl.median(cpus):.2f}s | vs base csv (median of round ratios): wall "
            f"{ratio(0):.3f}x, job {ratio(2):.3f}x, CPU {ratio(1):.3f}x"
        )
        summary[f"{name} {fmt}"] = {"wall": walls, "cpu": cpus, "job": jobs}
    print("json: " + json.dumps(summary))


if __name__ == "__main__":
    main()
