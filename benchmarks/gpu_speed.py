"""GPU extraction: `tlearn extract --device cuda` against the plain loop on the GPU, in one run.

    python benchmarks/gpu_speed.py DATA [--extra "--batch-size 128 --workers 15"]...

Needs a CUDA GPU. In ONE run, on the same images:
  1. the plain loop on the GPU (benchlib.plain_loop with the model and each batch moved to
     CUDA: timm + PIL + torch.stack + forward, fp32, batch 32), as its own process;
  2. `tlearn extract DATA -o out.csv --device cuda` (default options, fresh feature cache),
     and once more per --extra option set, each as its own process, while the GPU's busy
     fraction is sampled through NVML (nvidia-ml-py) every 50 ms;
  3. forward-only images/s of tlearn's CUDA runtime (channels_last + fp16 autocast, uint8
     pixels in) at batch 32/128/256, and of a plain fp32 NCHW forward at batch 32, on
     random batches already in host memory: the ceiling the data pipeline is measured
     against, also as achieved TFLOP/s.
Features of (1) and (2) are compared: tlearn runs in fp16 on CUDA (cache key 'amp-fp16').
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
from extract_speed import _agreement, run_tlearn  # noqa: E402

MODEL = "tf_efficientnet_lite0"


def child_plain(data: str, batch_size: int, save: str | None) -> None:
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from tlearn.backbone.weights import load_backbone

    paths = bl.list_images(data)
    model = load_backbone(MODEL, "auto").model.eval().cuda()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(paths), batch_size):
        batch = [transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]]
        with torch.no_grad():
            x = torch.stack(batch).cuda()
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).cpu())
    seconds = time.perf_counter() - t0
    if save:
        np.save(save, torch.cat(feats).numpy())
    print(json.dumps({"seconds": seconds, "images": len(paths)}))


def child_forward(batch_sizes: list[int], seconds_each: float) -> None:
    """Forward-only images/s on random batches already in (pinned) host memory."""
    import torch

    from tlearn.backbone.cut import feature_network
    from tlearn.backbone.layers import list_layers
    from tlearn.backbone.weights import load_backbone
    from tlearn.runtime.torch_runtime import TorchRuntime, example_input
    from tlearn.runtime.transforms import pixel_path

    backbone = load_backbone(MODEL, "auto")
    gflops = max(li.gflops for li in list_layers(backbone.model))
    net, spec = feature_network(backbone, None, "avg")
    cfg = backbone.data_config
    dev = torch.device("cuda")
    out = {"gflops_per_image": gflops}

    def rate(fn, x) -> float:
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds_each:
            fn(x)
            n += len(x)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    plain = net.to(dev).eval()  # first: TorchRuntime makes the weights channels_last

    def plain_fn(x):  # fp32 NCHW, as the plain loop runs it
        with torch.no_grad():
            return plain(x.to(dev)).cpu()

    x = example_input(cfg, 32, pixels=False, random=True).pin_memory()
    out["plain fp32 bs32"] = rate(plain_fn, x)
    runtime = TorchRuntime(net, dev, pixel_path(cfg))
    for bs in batch_sizes:
        x = example_input(cfg, bs, pixels=True, random=True).pin_memory()
        out[f"tlearn amp bs{bs}"] = rate(runtime, x)
    print(json.dumps(out))


def child_pipeline(data: str, n_images: int, worker_counts: list[int]) -> None:
    """Where the time goes, in one process with the CUDA runtime open: each loader alone
    (torch's DataLoader with pinned memory, as `extract --device cuda` runs; tlearn's
    torch-free decoding pool, as CPU runs use), each loader feeding the runtime, and the
    CSV text of the features."""

    import numpy as np
    import torch

    from tlearn.backbone.cut import feature_network
    from tlearn.backbone.weights import load_backbone
    from tlearn.data.decode import decoded_batches
    from tlearn.data.pixels import resize_target
    from tlearn.features.formats.csv_format import csv_text
    from tlearn.runtime.loader import torch_batches
    from tlearn.runtime.torch_runtime import TorchRuntime, example_input
    from tlearn.runtime.transforms import pixel_path

    paths = bl.list_images(data)
    paths = [paths[i % len(paths)] for i in range(n_images)]
    backbone = load_backbone(MODEL, "auto")
    net, spec = feature_network(backbone, None, "avg")
    cfg = backbone.data_config
    px, min_size = pixel_path(cfg), resize_target(cfg)
    dev = torch.device("cuda")
    runtime = TorchRuntime(net, dev, px)
    for bs in (32, 128):
        runtime(example_input(cfg, bs, pixels=True, random=True))
    out = {}
    for bs in (32, 128):
        for kind in ("torch", "pool"):
            for w in worker_counts:
                for forward in (False, True):
                    if kind == "torch":
                        it = torch_batches(paths, px[0], min_size, bs, w, object(), dev)
                    else:
                        it = decoded_batches(
                            paths, px[0], batch_size=bs, workers=w, min_size=min_size, keyed=True
                        )
                    t0, n = time.perf_counter(), 0
                    for _idx, x, _bad, _keys in it:
                        if forward:
                            runtime(x)
                        n += len(x)
                    name = f"{kind} loader, {w} workers, bs {bs}{' + forward' if forward else ''}"
                    out[name] = n / (time.perf_counter() - t0)
    # CSV text made by one process (tlearn.features.formats.csv_format.csv_text)
    feats = np.maximum(np.random.default_rng(0).standard_normal((1024, 1280)), 0)
    feats = feats.astype(np.float32)
    t0 = time.perf_counter()
    for i in range(0, 1024, 32):
        csv_text((["p"] * 32, [None] * 32, feats[i : i + 32]))
    out["CSV rows of 1280 features"] = 1024 / (time.perf_counter() - t0)
    print(json.dumps(out))


class GpuSampler:
    """The GPU's busy fraction (NVML utilization) sampled while a command runs."""

    def __init__(self, period: float = 0.05):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.nvml = pynvml
        except Exception as e:  # no NVML: time the runs anyway
            print(f"(no GPU utilization: {type(e).__name__}: {e})")
            self.nvml = None
        self.period = period
        self.samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self):
        def run():
            while self.nvml is not None and not self._stop.is_set():
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
                self.samples.append(util)
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        busy = [s for s in self.samples if s > 0]
        if not busy:
            return "GPU never busy"
        mean = sum(busy) / len(busy)
        return f"GPU utilization {mean:.0f}% on average while busy ({len(busy)} samples)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--extra", action="append", default=[], help="more tlearn extract options")
    ap.add_argument("--forward-seconds", type=float, default=4.0)
    ap.add_argument("--pipeline-images", type=int, default=0, help="also time the stages")
    ap.add_argument("--child", choices=["plain", "forward", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "plain":
        return child_plain(args.data, 32, args.save)
    if args.child == "forward":
        return child_forward([32, 128, 256], args.forward_seconds)
    if args.child == "pipeline":
        return child_pipeline(args.data, args.pipeline_images, [8, 15])

    import torch

    bl.print_machine(bl.machine())
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    n = len(bl.list_images(args.data))
    print(f"data: {args.data} ({n} images)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        me = [sys.executable, __file__, args.data]
        plain = bl.check(
            bl.run_measured([*me, "--child", "plain", "--save", str(tmp / "plain.npy")]),
            "plain loop",
        )
        p_sec = bl.child_json(plain)["seconds"]
        print(
            f"plain loop (cuda, fp32, bs 32): whole command {plain['wall']:.1f}s, "
            f"loop {p_sec:.1f}s = {n / p_sec:.0f} img/s"
        )
        for i, extra in enumerate(["", *args.extra]):
            opts = ["--device", "cuda", *shlex.split(extra)]
            csv = tmp / f"t{i}.csv"
            with GpuSampler() as gpu:
                res = run_tlearn(args.data, csv, tmp / f"cache{i}", opts)
            sec = res["seconds"]
            print(
                f"tlearn extract {' '.join(opts)}: whole command {res['wall']:.1f}s "
                f"({plain['wall'] / res['wall']:.2f}x the plain loop's); its own timer {sec:.1f}s "
                f"= {n / sec:.0f} img/s ({p_sec / sec:.2f}x the plain loop's); {gpu.summary()}"
            )
            if i == 0:
                print(f"  features vs plain fp32 loop: {_agreement(tmp / 'plain.npy', csv)}")
        fwd = bl.child_json(bl.check(bl.run_measured([*me, "--child", "forward"]), "forward"))
        g = fwd.pop("gflops_per_image")
        for name, ips in fwd.items():
            print(f"forward only, {name}: {ips:.0f} img/s ({ips * g / 1000:.2f} TFLOP/s)")
        if args.pipeline_images:
            cmd = [*me, "--child", "pipeline", "--pipeline-images", str(args.pipeline_images)]
            stages = bl.child_json(bl.check(bl.run_measured(cmd), "pipeline"))
            for name, ips in stages.items():
                print(f"stage: {name}: {ips:.0f} per s")


if __name__ == "__main__":
    main()
