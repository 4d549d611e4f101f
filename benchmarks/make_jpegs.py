"""Make a folder of fixed-size JPEGs from real photos, for the benchmarks.

    python benchmarks/make_jpegs.py ../shared/data/hymenoptera /tmp/j250 --size 250
    python benchmarks/make_jpegs.py ../shared/data/hymenoptera /tmp/j250x4 --variants 4
    python benchmarks/make_jpegs.py ../shared/data/hymenoptera /tmp/j250x16 --variants 4 \
        --qualities 90,85,80,75
    python benchmarks/make_jpegs.py ../shared/data/hymenoptera /tmp/j250n --count 50000

Class folders are kept (SRC/<split>/<class>/x.jpg -> DST/<class>/<split>_x.jpg). Each
variant is a different view of the photo (whole, mirrored, two 80% crops), resized to
SIZE x SIZE and saved at quality 90 (or at each of --qualities), so every file has its
own content (the feature cache keys by content). With --count N, N JPEGs are made from
seeded random crops (40-100% of the shorter side, anywhere, mirrored or not) of the photos
in turn, in a process per core: as many distinct images as a GPU benchmark needs (issue
15 asks for 50,000). Write the folder outside the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


def views(img, n: int):
    from PIL import Image

    w, h = img.size
    out = [img]
    if n > 1:
        out.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if n > 2:
        out.append(img.crop((w // 10, h // 10, w - w // 10, h - h // 10)))
    if n > 3:
        out.append(img.crop((0, 0, int(w * 0.8), int(h * 0.8))))
    return out[:n]


def _random_crops(job) -> int:
    """Write the JPEGs numbered start..stop-1: crop k comes from photo k % len(photos)."""
    import random

    from PIL import Image

    from tlearn.data.image import load_image

    photos, start, stop, size, dst = job
    done = 0
    for k in range(start, stop):
        src, cls = photos[k % len(photos)]
        img = load_image(src)
        rng = random.Random(k)
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        view = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = Path(dst) / cls / f"crop_{k:07d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        view.save(out, quality=rng.choice([95, 90, 85, 80]))
        done += 1
    return done


def make_count(src: str, dst: Path, count: int, size: int) -> int:
    import multiprocessing

    from tlearn.core.errors import ImageLoadError
    from tlearn.data.image import load_image

    photos = []
    for p in map(Path, bl.list_images(src)):
        try:
            load_image(p)
        except ImageLoadError:
            continue
        photos.append((str(p), p.parent.name))
    per = max(1, count // (8 * (os.cpu_count() or 1)))
    jobs = [(photos, lo, min(count, lo + per), size, str(dst)) for lo in range(0, count, per)]
    with multiprocessing.Pool() as pool:
        return sum(pool.imap_unordered(_random_crops, jobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size", type=int, default=250)
    ap.add_argument("--variants", type=int, default=1, choices=[1, 2, 3, 4])
    ap.add_argument("--qualities", default="90", help="JPEG qualities, comma-separated")
    ap.add_argument("--count", type=int, default=0, help="N distinct random crops instead")
    args = ap.parse_args()
    if args.count:
        n = make_count(args.src, args.dst, args.count, args.size)
        print(f"wrote {n} JPEGs of {args.size}x{args.size} to {args.dst}")
        return
    qualities = [int(q) for q in args.qualities.split(",")]
    from PIL import Image

    from tlearn.core.errors import ImageLoadError
    from tlearn.data.image import load_image

    n = 0
    for p in map(Path, bl.list_images(args.src)):
        try:
            img = load_image(p)
        except ImageLoadError:
            continue
        rel = p.relative_to(args.src)
        cls, prefix = rel.parent.name, "_".join(rel.parent.parts[:-1])
        for k, v in enumerate(views(img, args.variants)):
            small = v.resize((args.size, args.size), Image.Resampling.BICUBIC)
            for q in qualities:
                stem = f"{prefix + '_' if prefix else ''}{p.stem}{'' if k == 0 else f'_v{k}'}"
                name = f"{stem}{'' if q == qualities[0] else f'_q{q}'}.jpg"
                out = args.dst / cls / name
                out.parent.mkdir(parents=True, exist_ok=True)
                small.save(out, quality=q)
                n += 1
    print(f"wrote {n} JPEGs of {args.size}x{args.size} to {args.dst}")


if __name__ == "__main__":
    main()
