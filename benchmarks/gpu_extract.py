"""Extraction at GPU scale (issue 15): the whole table in ONE run, printed as JSON.

    python benchmarks/make_jpegs.py ../shared/data/hymenoptera /tmp/j250n --count 50000
    python benchmarks/gpu_extract.py /tmp/j250n                    # on a GPU machine
    python benchmarks/gpu_extract.py DATA --device cpu --images 64  # smoke test, any machine

On the same images, each as its own process (so every figure includes what a user's
process pays), in one run:
  1. `tlearn extract` with each --decode (cpu, and gpu on CUDA) and each output format
     (parquet, npy, csv), a fresh feature cache each time (cache writes included); the
     rate is the command's own (--json: first image read to last row written), start-up
     (interpreter, imports, model, CUDA, autotuning) reported apart, with its stage times;
  2. an experienced user's loop: torch DataLoader (a worker per core, batch 256, pinned
     memory), fp16 + channels_last on CUDA, features saved to .npy;
  3. a naive loop: PIL + timm's transform in the main process, batch 64, fp32
     (on --naive-images of the images: it is slow);
  4. the CPU pipeline's ceiling: decode + resize + crop only (tlearn's decoding step,
     JPEG draft included), a process per core, pixels handed back to the parent;
  5. on CUDA, GPU decoding alone (nvJPEG + resize + crop, tlearn.runtime.gpu_decode).
Then the ratios the issue sets targets for, and how close GPU-decoded features are to
CPU-decoded ones (cosine), and that Parquet and NPY hold the CSV's numbers.

Timings are with the bundled weights of tf_efficientnet_lite0 (random weights would not
change speed). Fine-tuning (the issue's last target) is measured by bench_finetune.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

MODEL = "tf_efficientnet_lite0"
FORMATS = ("parquet", "npy", "csv")


def _paths(list_csv: str) -> list[str]:
    with open(list_csv, newline="", encoding="utf-8") as f:
        return [row["path"] for row in csv.DictReader(f)]


def _model_and_transform(device: str):
    import timm

    from tlearn.backbone.weights import load_backbone

    model = load_backbone(MODEL, "auto").model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, cfg, timm.data.create_transform(**cfg)


# ----------------------------------------------------------------------------- children


def child_experienced(list_csv: str, device: str, batch: int, workers: int, save: str) -> None:
    """DataLoader, pinned memory, fp16 + channels_last on CUDA, features to .npy."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    paths = _paths(list_csv)
    model, _, transform = _model_and_transform(device)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = model.to(dev).to(memory_format=torch.channels_last)
    if cuda:
        model = model.half()
        torch.backends.cudnn.benchmark = True

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB"))

    loader = DataLoader(Images(), batch_size=batch, num_workers=workers, pin_memory=cuda)
    t0 = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for x in loader:
            x = x.to(dev, non_blocking=True).to(memory_format=torch.channels_last)
            if cuda:
                x = x.half()
            y = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(y.float().cpu())
    np.save(save, torch.cat(feats).numpy())
    print(json.dumps({"seconds": time.perf_counter() - t0, "images": len(paths)}))


def child_naive(list_csv: str, device: str, batch: int, n: int) -> None:
    """PIL + timm's transform in the main process, fp32."""
    import torch
    from PIL import Image

    paths = _paths(list_csv)[:n]
    model, _, transform = _model_and_transform(device)
    dev = torch.device(device)
    model = model.to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
            model.forward_head(model.forward_features(x.to(dev)), pre_logits=True).cpu()
    print(json.dumps({"seconds": time.perf_counter() - t0, "images": len(paths)}))


def _steps():
    from tlearn.data.pixels import resize_target
    from tlearn.runtime.transforms import pixel_path

    _, cfg, _ = _model_and_transform("cpu")
    return pixel_path(cfg)[0], resize_target(cfg)


def child_ceiling(list_csv: str, procs: int, batch: int) -> None:
    """tlearn's decoding step alone (decode with draft + resize + crop), `procs` processes."""
    import multiprocessing

    from tlearn.data.decode import decode_batch

    paths = _paths(list_csv)
    steps, min_size = _steps()
    jobs = [
        (lo, paths[lo : lo + batch], steps, min_size, False) for lo in range(0, len(paths), batch)
    ]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        pool.map(abs, range(procs))  # workers started before the clock
        t0 = time.perf_counter()
        n = sum(len(r[0]) for r in pool.imap(decode_batch, jobs, chunksize=1))
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "images": n}))


def child_gpu_decode(list_csv: str, batch: int) -> None:
    """nvJPEG + resize + crop on the GPU alone (tlearn.runtime.gpu_decode)."""
    import torch

    from tlearn.runtime.gpu_decode import gpu_batches

    paths = _paths(list_csv)
    steps, _ = _steps()
    dev = torch.device("cuda")
    for _ in gpu_batches(paths[:batch], steps, dev, batch_size=batch, min_size=None, keyed=False):
        pass  # warm-up: nvJPEG handles, kernels
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for idx, _x, _bad, _keys in gpu_batches(
        paths, steps, dev, batch_size=batch, min_size=None, keyed=True
    ):
        n += len(idx)
    torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - t0, "images": n}))


# ----------------------------------------------------------------------------- parent


def _write_list(data: str, images: int, dest: Path) -> int:
    paths = bl.list_images(data)
    if not paths:
        raise SystemExit(f"no images in {data}")
    if images and images < len(paths):
        paths = paths[:images]
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in paths:
            w.writerow([p, Path(p).parent.name])
    return len(paths)


def _child(args, tmp: Path, kind: str, *extra: str) -> tuple[dict, dict]:
    cmd = [sys.executable, __file__, args.data, "--child", kind, "--list", str(tmp / "list.csv")]
    res = bl.check(bl.run_measured([*cmd, *extra], env=bl.child_env()), kind)
    return res, bl.child_json(res)


def _tlearn(args, tmp: Path, decode: str, fmt: str) -> dict:
    out = tmp / f"out-{decode}.{fmt}"
    cmd = bl.tlearn_cmd(
        "extract",
        args.data,
        "--labels",
        str(tmp / "list.csv"),
        "-o",
        str(out),
        "--device",
        args.device,
        "--decode",
        decode,
        "--batch-size",
        str(args.batch_size),
        "--json",
        "-q",
    )
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    env = bl.child_env(TLEARN_CACHE_DIR=str(tmp / f"cache-{decode}-{fmt}"))
    res = bl.check(bl.run_measured(cmd, env=env), f"tlearn --decode {decode} -o .{fmt}")
    summary = json.loads(res["stdout"].strip().splitlines()[-1])
    return {
        "what": f"tlearn extract --decode {decode} -o .{fmt}",
        "images_per_s": summary["images_per_second"],
        "run_seconds": summary["run_seconds"],
        "startup_seconds": summary["startup_seconds"],
        "wall_seconds": res["wall"],
        "whole_command_images_per_s": summary["rows"] / res["wall"],
        "stages": summary["engine"]["stages"],
        "out": str(out),
    }


def _loop_row(what: str, res: dict, got: dict) -> dict:
    return {
        "what": what,
        "images_per_s": got["images"] / got["seconds"],
        "run_seconds": got["seconds"],
        "wall_seconds": res["wall"],
        "whole_command_images_per_s": got["images"] / res["wall"],
    }


def _agreement(rows: list[dict], tmp: Path) -> dict:
    import numpy as np

    from tlearn.features.table import read_table

    out: dict = {}
    by = {r["what"]: r for r in rows}
    csv_row = by.get("tlearn extract --decode cpu -o .csv")
    if csv_row:
        ref = read_table(csv_row["out"])
        for fmt in ("parquet", "npy"):
            r = by.get(f"tlearn extract --decode cpu -o .{fmt}")
            if r:
                t = read_table(r["out"])
                same = t.paths == ref.paths and np.array_equal(t.X, ref.X)
                out[f"{fmt} holds the CSV's numbers"] = bool(same)
    cpu, gpu = (by.get(f"tlearn extract --decode {d} -o .parquet") for d in ("cpu", "gpu"))
    if cpu and gpu:
        a, b = read_table(cpu["out"]), read_table(gpu["out"])
        index = {p: i for i, p in enumerate(b.paths)}
        common = [(i, index[p]) for i, p in enumerate(a.paths) if p in index]
        A = a.X[[i for i, _ in common]]
        B = b.X[[j for _, j in common]]
        cos = (A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1) + 1e-12)
        out["gpu vs cpu decoding: cosine min"] = float(cos.min())
        out["gpu vs cpu decoding: cosine median"] = float(np.median(cos))
        out["gpu vs cpu decoding: rows compared"] = len(common)
    exp = tmp / "experienced.npy"
    if exp.is_file() and csv_row:
        X = np.load(exp)
        ref = read_table(csv_row["out"]).X
        if X.shape == ref.shape:
            cos = (X * ref).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(ref, axis=1))
            out["experienced loop vs tlearn cpu: cosine min"] = float(cos.min())
    return out


def _ratios(rows: list[dict]) -> dict:
    rate = {r["what"]: r["images_per_s"] for r in rows}
    ceiling = rate.get("decode + resize + crop only (CPU ceiling)")
    exp = rate.get("experienced user's loop")
    out: dict = {}
    for dec in ("cpu", "gpu"):
        pq = rate.get(f"tlearn extract --decode {dec} -o .parquet")
        if pq is None:
            continue
        if ceiling:
            target = 0.85 if dec == "cpu" else 1.5
            out[f"--decode {dec} parquet / CPU ceiling"] = [pq / ceiling, f">= {target}"]
        if exp:
            out[f"--decode {dec} parquet / experienced loop"] = [pq / exp, "(~2.8 for cpu)"]
        csv_rate = rate.get(f"tlearn extract --decode {dec} -o .csv")
        if csv_rate:
            out[f"--decode {dec} csv / parquet"] = [csv_rate / pq, ">= 0.7"]
    starts = [r["startup_seconds"] for r in rows if r.get("startup_seconds") is not None]
    if starts:
        out["tlearn start-up seconds (max)"] = [max(starts), "< 5"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test)")
    ap.add_argument("--images", type=int, default=0, help="use the first N images (0: all)")
    ap.add_argument("--naive-images", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=256, help="tlearn and the experienced loop")
    ap.add_argument("--workers", type=int, default=None, help="tlearn --workers (default: auto)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--decodes", default=None, help="default: cpu,gpu on CUDA, cpu otherwise")
    ap.add_argument("--json-out", help="also write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cores = bl.machine()["cores"]
    if args.child == "experienced":
        return child_experienced(args.list, args.device, args.batch_size, cores, args.save)
    if args.child == "naive":
        return child_naive(args.list, args.device, 64, args.naive_images)
    if args.child == "ceiling":
        return child_ceiling(args.list, cores, 32)
    if args.child == "gpu-decode":
        return child_gpu_decode(args.list, args.batch_size)

    info = bl.machine()
    bl.print_machine(info)
    cuda = args.device.startswith("cuda")
    decodes = (args.decodes or ("cpu,gpu" if cuda else "cpu")).split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tlearn-gpu-extract-") as tmp_name:
        tmp = Path(tmp_name)
        n = _write_list(args.data, args.images, tmp / "list.csv")
        print(f"data: {args.data} ({n} images), device {args.device}, batch {args.batch_size}")
        res, got = _child(args, tmp, "ceiling")
        rows.append(_loop_row("decode + resize + crop only (CPU ceiling)", res, got))
        if cuda:
            res, got = _child(args, tmp, "gpu-decode", "--batch-size", str(args.batch_size))
            rows.append(_loop_row("GPU decode + resize + crop only", res, got))
        for decode in decodes:
            for fmt in args.formats.split(","):
                rows.append(_tlearn(args, tmp, decode, fmt))
                print(f"  {rows[-1]['what']}: {rows[-1]['images_per_s']:.0f} img/s", flush=True)
        extra = ["--device", args.device, "--batch-size", str(args.batch_size)]
        res, got = _child(args, tmp, "experienced", *extra, "--save", str(tmp / "experienced.npy"))
        rows.append(_loop_row("experienced user's loop", res, got))
        extra = ["--device", args.device, "--naive-images", str(args.naive_images)]
        res, got = _child(args, tmp, "naive", *extra)
        rows.append(_loop_row("naive loop (PIL in the main process, batch 64)", res, got))
        agreement = _agreement(rows, tmp)
    for r in rows:
        r.pop("out", None)
        print(
            f"{r['what']:55s} {r['images_per_s']:8.0f} img/s in its loop; whole process "
            f"{r['whole_command_images_per_s']:7.0f} img/s"
            + (f"; start-up {r['startup_seconds']:.1f}s" if r.get("startup_seconds") else "")
        )
    ratios = _ratios(rows)
    for name, (value, target) in ratios.items():
        print(f"  {name}: {value:.2f} (target {target})")
    for name, value in agreement.items():
        print(f"  {name}: {value}")
    summary = {
        "machine": info,
        "gpu": _gpu_name() if cuda else None,
        "images": n,
        "device": args.device,
        "batch_size": args.batch_size,
        "rows": rows,
        "ratios": {k: v[0] for k, v in ratios.items()},
        "targets": {k: v[1] for k, v in ratios.items()},
        "agreement": agreement,
    }
    text = json.dumps(summary)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print("json: " + text)


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:
        return None


if __name__ == "__main__":
    main()
