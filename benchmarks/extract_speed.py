"""`tlearn extract` against the plain reference loop, on the same images, in one run.

    python benchmarks/extract_speed.py DATA [--rounds 2] [--mid-layer 2]

Each round runs, as separate processes on a cold feature cache (a fresh, empty
TLEARN_CACHE_DIR, so the ONNX export is included):
  1. the plain loop (benchlib.plain_loop: timm + PIL + torch.stack + forward, batch 32),
  2. `tlearn extract DATA -o out.csv` with default options (full depth),
  3. `tlearn extract DATA -o out.csv --layer MID` (the middle stage of the backbone).
  4. `tlearn extract DATA -o out.csv` again with a cache that holds the exported graph of
     this cut (from a run on one other image) but none of these images' features: the
     state after any earlier use of the backbone. Such a run needs no torch (tlearn.warm).
Rounds alternate the order. Two figures per run: the whole command (interpreter start,
imports, model load, export, extraction, CSV) and the part after imports (what each
program reports itself). Then, in one more process with the exported model ready, the
extraction phase is timed against the backend's forward-only images/s on random batches
of the same size (decoding hidden behind compute?), and converted to GFLOP/s.

Targets (issue 5, 2-core CPU): extract >= 3x the plain loop's images/s; extraction >= 80%
of forward-only images/s; middle-stage cut <= 0.6x the time of full depth.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

MODEL = "tf_efficientnet_lite0"


# ----------------------------------------------------------------------------- children


def child_plain(data: str, batch_size: int, save: str | None) -> None:
    import numpy as np
    import PIL.Image  # noqa: F401  (imports outside the timed part, as for tlearn)
    import timm  # noqa: F401
    import torch  # noqa: F401

    paths = bl.list_images(data)
    t0 = time.perf_counter()
    X = bl.plain_loop(paths, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    if save:
        np.save(save, X)
    print(json.dumps({"seconds": seconds, "images": len(paths)}))


def child_phase(
    data: str,
    layers: list[str],
    batch_size: int,
    backend: str,
    reps: int,
    n_images: int,
    workers: int | None = None,
    intra_op: bool = False,
) -> None:
    """Extraction phase vs forward-only, per cut, with the runtime already open. The image
    list is cycled to `n_images` (a repeat is computed again: the cache is read only
    before the run), so each timed run is long enough to even out scheduler noise."""
    import torch

    from tlearn.backbone.layers import list_layers
    from tlearn.backbone.weights import load_backbone
    from tlearn.cache.store import FeatureStore, cache_root
    from tlearn.core.options import RunOptions
    from tlearn.core.spec import FINAL_LAYER
    from tlearn.features.engine import CutRequest, open_engine
    from tlearn.features.stream import iter_features
    from tlearn.runtime.export import cached_onnx
    from tlearn.runtime.ort import LazyRuntime, OnnxRuntime
    from tlearn.runtime.torch_runtime import example_input
    from tlearn.runtime.transforms import pixel_path

    paths = bl.list_images(data)
    paths = [paths[i % len(paths)] for i in range(max(n_images, len(paths)))]
    backbone = load_backbone(MODEL, "auto")
    table = {li.name: li.gflops for li in list_layers(backbone.model)}
    full_gflops = max(table.values())
    cfg = backbone.data_config
    results = {}
    runs = [(layer, False) for layer in layers]
    if intra_op:
        runs.append(("final", True))
    for layer, whole_batch in runs:
        run = RunOptions(backend=backend, device="cpu", cache=True)
        request = CutRequest(MODEL, "auto", None if layer == "final" else layer, "avg")
        engine = open_engine(request, run, backbone=backbone)
        net, spec = engine.network, engine.spec
        name = spec.layers[0] + (" intra-op" if whole_batch else "")
        gflops = full_gflops if spec.layers[0] == FINAL_LAYER else table[spec.layers[0]]
        if whole_batch:  # for comparison: ORT on the whole batch with intra-op threads
            px = pixel_path(cfg)
            path = cached_onnx(net, spec, cfg, cache_root(), px)
            engine.runtime = LazyRuntime(
                lambda path=path, px=px: OnnxRuntime(
                    path, torch.device("cpu"), streams=1, transform=px[0]
                ),
                torch.device("cpu"),
                px[0],
            )
        pixels = engine.runtime.transform is not None
        x = example_input(cfg, batch_size, pixels, random=True)
        engine.runtime(x)  # export (or load) and warm up
        n_batches = max(1, math.ceil(len(paths) / batch_size))
        fwd, e2e, cpu = [], [], {"forward": [], "main": [], "workers": []}
        for _ in range(reps):
            ips, c = _forward_only(engine.runtime, x, n_batches)
            fwd.append(ips)
            cpu["forward"].append(c)
            with tempfile.TemporaryDirectory() as tmp:  # cold features every time
                store = FeatureStore.open(
                    Path(tmp), spec, cfg, draft=engine.draft, precision=engine.precision
                )
                c_main, c_kids = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                n = 0
                for b in iter_features(
                    engine.runtime,
                    paths,
                    cfg,
                    batch_size=batch_size,
                    cache=store,
                    workers=workers,
                ):
                    n += len(b.indices)
                e2e.append(n / (time.perf_counter() - t))
                gc.collect()  # the finished loader joins its workers: their CPU time counts
                cpu["main"].append((_cpu(resource.RUSAGE_SELF) - c_main) / n)
                cpu["workers"].append((_cpu(resource.RUSAGE_CHILDREN) - c_kids) / n)
            ips, c = _forward_only(engine.runtime, x, n_batches)
            fwd.append(ips)
            cpu["forward"].append(c)
        results[name] = {
            "backend": engine.runtime.name,
            "gflops_per_image": gflops,
            "forward_all": fwd,
            "extract_all": e2e,
            # CPU seconds per image: forward only; extraction's main process (runtime +
            # orchestration) and its decoding workers.
            "cpu_per_image": {k: bl.median(v) for k, v in cpu.items()},
        }
    print(json.dumps(results))


def _cpu(who) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def _forward_only(runtime, x, n_batches: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the runtime alone on one batch, n_batches times."""
    c, t = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n_batches):
        runtime(x)
    n = n_batches * len(x)
    return n / (time.perf_counter() - t), (_cpu(resource.RUSAGE_SELF) - c) / n


# ----------------------------------------------------------------------------- parent


_SECONDS = re.compile(r"in ([\d.]+)s")


def run_tlearn(data: str, out: Path, cache: Path, extra: list[str]) -> dict:
    res = bl.check(
        bl.run_measured(
            bl.tlearn_cmd("extract", data, "-o", str(out), *extra),
            env=bl.child_env(TLEARN_CACHE_DIR=str(cache)),
        ),
        "tlearn extract",
    )
    m = _SECONDS.search(res["stderr"].split("wrote", 1)[-1])
    res["seconds"] = float(m.group(1)) if m else float("nan")
    return res


def _prepare_warm_cache(tmp: Path, common: list[str]) -> Path:
    """A cache holding the exported graph (and resolved cut) of the default full-depth
    cut, made by extracting one generated image that is not in the data."""
    from PIL import Image

    one = tmp / "one-image" / "x"
    one.mkdir(parents=True)
    Image.new("RGB", (300, 200), (120, 90, 60)).save(one / "x.jpg")
    cache = tmp / "cache-warm"
    run_tlearn(str(one.parent), tmp / "one.csv", cache, common)
    return cache


def run_plain(data: str, batch_size: int, save: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "plain", data, "--batch-size", str(batch_size)]
    if save:
        cmd += ["--save", str(save)]
    res = bl.check(bl.run_measured(cmd, env=bl.child_env()), "plain loop")
    res["seconds"] = bl.child_json(res)["seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="folder of images (searched recursively)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mid-layer", default="2", help="the middle cut (stage index or name)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--phase-reps", type=int, default=3)
    ap.add_argument("--phase-images", type=int, default=800, help="images per phase run")
    ap.add_argument("--workers", type=int, help="decoding processes (default: tlearn's)")
    ap.add_argument(
        "--intra-op",
        action="store_true",
        help="also time ONNX Runtime on whole batches with intra-op threads (for comparison)",
    )
    ap.add_argument("--child", choices=["plain", "phase"], help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="final", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "plain":
        return child_plain(args.data, args.batch_size, args.save)
    if args.child == "phase":
        layers = args.layers.split(";")
        return child_phase(
            args.data,
            layers,
            args.batch_size,
            args.backend,
            args.phase_reps,
            args.phase_images,
            args.workers,
            args.intra_op,
        )

    info = bl.machine()
    bl.print_machine(info)
    n = len(bl.list_images(args.data))
    print(f"data: {args.data} ({n} images), batch size {args.batch_size}, model {MODEL}")
    common = ["--batch-size", str(args.batch_size), "--backend", args.backend]
    if args.workers is not None:
        common += ["--workers", str(args.workers)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlearn-bench-") as tmp:
        tmp = Path(tmp)
        plain_npy = tmp / "plain.npy"
        warm_cache = _prepare_warm_cache(tmp, common)
        for r in range(args.rounds):
            order = ["plain", "full", "mid", "warm"]
            order = order if r % 2 == 0 else order[::-1]
            got = {}
            for what in order:
                cache = tmp / f"cache-{r}-{what}"  # fresh: cold features and cold export
                if what == "warm":
                    shutil.rmtree(warm_cache / "features", ignore_errors=True)
                    got[what] = run_tlearn(args.data, tmp / "warm.csv", warm_cache, common)
                elif what == "plain":
                    got[what] = run_plain(args.data, args.batch_size, plain_npy if r == 0 else None)
                elif what == "full":
                    got[what] = run_tlearn(args.data, tmp / "full.csv", cache, common)
                else:
                    extra = [*common, "--layer", args.mid_layer]
                    got[what] = run_tlearn(args.data, tmp / "mid.csv", cache, extra)
            rows.append(got)
            p, f, m, w = got["plain"], got["full"], got["mid"], got["warm"]
            print(
                f"round {r + 1}: whole command  plain {p['wall']:.1f}s  tlearn {f['wall']:.1f}s  "
                f"tlearn mid {m['wall']:.1f}s  tlearn warm {w['wall']:.1f}s | after imports  "
                f"plain {p['seconds']:.1f}s  tlearn {f['seconds']:.1f}s  tlearn mid "
                f"{m['seconds']:.1f}s  tlearn warm {w['seconds']:.1f}s",
                flush=True,
            )
        agreement = _agreement(plain_npy, tmp / "full.csv")
        phase_cmd = [sys.executable, __file__, "--child", "phase", args.data]
        phase_cmd += ["--layers", f"final;{args.mid_layer}", "--batch-size", str(args.batch_size)]
        phase_cmd += ["--backend", args.backend, "--phase-reps", str(args.phase_reps)]
        phase_cmd += ["--phase-images", str(args.phase_images)]
        if args.workers is not None:
            phase_cmd += ["--workers", str(args.workers)]
        if args.intra_op:
            phase_cmd += ["--intra-op"]
        env = bl.child_env(TLEARN_CACHE_DIR=str(tmp / "cache-0-full"))  # export is there
        phase_res = bl.check(bl.run_measured(phase_cmd, env=env), "phase measurement")
        phase = bl.child_json(phase_res)

    def times(key, what):
        return [r[what][key] for r in rows]

    def verdict(ok_median: bool, ok_best: bool) -> str:
        if ok_median and ok_best:
            return "met"
        if ok_median or ok_best:
            return f"met on {'median' if ok_median else 'best'} only"
        return "NOT met"

    print()
    print("== tlearn extract vs plain loop: speed-up = plain time / tlearn time")
    print("   (median of rounds, and best of rounds: other load only ever slows a run down)")
    for what, cache_state in (
        ("full", "cold cache: export included"),
        ("warm", "graph exported earlier, features cold"),
    ):
        print(f"  tlearn with a {cache_state}:")
        for key, label in (("wall", "whole command"), ("seconds", "after imports")):
            pm, fm = bl.median(times(key, "plain")), bl.median(times(key, what))
            pb, fb = min(times(key, "plain")), min(times(key, what))
            print(
                f"    {label:14s} plain {n / pm:6.1f} img/s   tlearn {n / fm:6.1f} img/s   "
                f"speed-up {pm / fm:.2f}x (best {pb / fb:.2f}x)"
                f"   [target >= 3x: {verdict(pm / fm >= 3, pb / fb >= 3)}]"
            )
    print(f"  features: tlearn vs plain loop {agreement}")
    print()
    print(
        f"== extraction phase vs forward-only, {args.phase_images} images per run, runtime "
        f"open, cold feature cache (median / best of {args.phase_reps})"
    )
    full_name = "final"
    mid_name = next(k for k in phase if k != full_name and "intra-op" not in k)
    peak = info.get("peak_gflops") or float("nan")
    for name in (full_name, mid_name, *(k for k in phase if "intra-op" in k)):
        ph = phase[name]
        fwd, ext = bl.median(ph["forward_all"]), bl.median(ph["extract_all"])
        fwd_b, ext_b = max(ph["forward_all"]), max(ph["extract_all"])
        gf = ph["gflops_per_image"]
        print(
            f"  {name} ({ph['backend']}) forward-only {fwd:6.1f} img/s (best {fwd_b:.1f}), "
            f"extraction {ext:6.1f} img/s (best {ext_b:.1f}) = {100 * ext / fwd:.0f}% of "
            f"forward-only (best/best {100 * ext_b / fwd_b:.0f}%)   [target >= 80%: "
            f"{verdict(ext / fwd >= 0.8, ext_b / fwd_b >= 0.8)}]"
        )
        c = ph["cpu_per_image"]
        ceiling = c["forward"] / (c["main"] + c["workers"])
        print(
            f"           CPU per image: forward-only {1000 * c['forward']:.2f} ms; extraction "
            f"{1000 * c['main']:.2f} ms main process + {1000 * c['workers']:.2f} ms decoding "
            f"-> with every core busy, extraction can reach at most {100 * ceiling:.0f}% "
            "of forward-only"
        )
        print(
            f"           {gf:.3f} GFLOP/image -> {gf * fwd_b:.1f} GFLOP/s forward-only, "
            f"{gf * ext_b:.1f} GFLOP/s extracting (best runs); rough fp32 peak {peak} GFLOP/s "
            f"(forward-only at {100 * gf * fwd_b / peak:.0f}% of it)"
        )
    print()
    print(f"== middle stage ({mid_name}) vs full depth: time ratio mid / full (lower is better)")
    for key, label in (("seconds", "after imports"), ("wall", "whole command")):
        med = bl.median(times(key, "mid")) / bl.median(times(key, "full"))
        best = min(times(key, "mid")) / min(times(key, "full"))
        print(f"  {label:16s} {med:.2f}x (best {best:.2f}x)")
    pf, pm = phase[full_name], phase[mid_name]
    med = bl.median(pf["extract_all"]) / bl.median(pm["extract_all"])
    best = max(pf["extract_all"]) / max(pm["extract_all"])
    fwd = max(pf["forward_all"]) / max(pm["forward_all"])
    print(
        f"  extraction phase {med:.2f}x (best {best:.2f}x)   [target <= 0.6x: "
        f"{verdict(med <= 0.6, best <= 0.6)}]   forward-only {fwd:.2f}x   "
        f"FLOPs {pm['gflops_per_image'] / pf['gflops_per_image']:.2f}x"
    )
    summary = {
        "machine": info,
        "images": n,
        "rounds": [
            {k: {"wall": v["wall"], "seconds": v["seconds"]} for k, v in r.items()} for r in rows
        ],
        "phase": phase,
    }
    print()
    print("json: " + json.dumps(summary))


def _agreement(plain_npy: Path, csv_path: Path) -> str:
    import numpy as np

    from tlearn.features.table import read_features_csv

    if not plain_npy.is_file():
        return "(not compared)"
    a = np.load(plain_npy, allow_pickle=False)
    b = read_features_csv(csv_path).X
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    diff = np.abs(a - b).max(axis=1)
    return (
        f"max |diff| {diff.max():.2g} (median over images {np.median(diff):.2g}; feature scale "
        f"{np.abs(a).max():.2g}); images differing by > 1e-3: {(diff > 1e-3).sum()}"
    )


if __name__ == "__main__":
    main()
