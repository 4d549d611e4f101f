"""Peak memory of `tlearn extract` on 20,000 images against 2,000: extraction streams.

    python benchmarks/memory.py [--small 2000] [--large 20000] [--layer blocks.0]
                                [--images /tmp/tlearn-rss-images]

Generates small JPEGs (96x96, noise + gradient) under --images (outside the repo; reused
when already there), in folders of 2,000: the small run reads the first folder, the large
run all of them. Each run is `tlearn extract FOLDER(S) -o out.csv --layer LAYER` on a cold
feature cache (a fresh TLEARN_CACHE_DIR), a separate process. Peak RSS is the main
process's high-water mark (wait4 ru_maxrss); the tree figure adds the decoding workers,
sampled every 0.1 s. An early cut keeps 20,000 images quick; what is measured is memory.

Target (issue 5): peak RSS on 20,000 images <= 1.2x the peak on 2,000.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

PER_FOLDER = 2000


def make_images(root: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folders = []
    for f in range((n + PER_FOLDER - 1) // PER_FOLDER):
        folder = root / f"part{f:03d}"
        folders.append(folder)
        want = min(PER_FOLDER, n - f * PER_FOLDER)
        have = len(list(folder.glob("*.jpg"))) if folder.is_dir() else 0
        if have >= want:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(f)
        grad = np.linspace(0, 120, 96, dtype=np.float32)[None, :, None]
        for i in range(want):
            base = rng.uniform(0, 135, 3).astype(np.float32)
            px = base + grad + rng.normal(0, 20, (96, 96, 3)).astype(np.float32)
            img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
            img.save(folder / f"img{i:05d}.jpg", quality=85)
    return folders


def run(folders: list[Path], layer: str, tmp: Path, tag: str, extra: list[str]) -> dict:
    out = tmp / f"{tag}.csv"
    cmd = bl.tlearn_cmd("extract", *map(str, folders), "-o", str(out), "--layer", layer, "-q")
    env = bl.child_env(TLEARN_CACHE_DIR=str(tmp / f"cache-{tag}"))
    return bl.check(bl.run_measured([*cmd, *extra], env=env), f"tlearn extract ({tag})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--layer", default="blocks.0")
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "tlearn-rss")
    args = ap.parse_args()
    if args.small % PER_FOLDER or args.large % PER_FOLDER:
        raise SystemExit(f"--small and --large must be multiples of {PER_FOLDER}")
    bl.print_machine(bl.machine())
    folders = make_images(args.images, args.large)
    small = folders[: args.small // PER_FOLDER]
    print(f"images: {args.images} ({args.large} JPEGs of 96x96), cut at {args.layer}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlearn-bench-") as tmp:
        tmp = Path(tmp)
        for label, extra in (("default (cache on, cold)", []), ("--no-cache", ["--no-cache"])):
            s = run(small, args.layer, tmp, "small", extra)
            big = run(folders, args.layer, tmp, "large", extra)
            rows.append((label, s, big))
    print()
    print(f"== peak memory, {args.large} vs {args.small} images")
    for label, s, big in rows:
        r_main = big["peak_rss_mib"] / s["peak_rss_mib"]
        r_tree = big["peak_tree_rss_mib"] / s["peak_tree_rss_mib"]
        print(
            f"  {label:26s} main process {s['peak_rss_mib']:6.0f} -> {big['peak_rss_mib']:6.0f} "
            f"MiB ({r_main:.2f}x)   with workers {s['peak_tree_rss_mib']:6.0f} -> "
            f"{big['peak_tree_rss_mib']:6.0f} MiB ({r_tree:.2f}x)   "
            f"[target <= 1.2x: {'met' if max(r_main, r_tree) <= 1.2 else 'NOT met'}]   "
            f"time {s['wall']:.0f}s / {big['wall']:.0f}s"
        )


if __name__ == "__main__":
    main()
