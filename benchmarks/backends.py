"""Forward-only images/s of the ways to run the cut network on CPU, in one run.

    python benchmarks/backends.py [--layers "final;2"] [--reps 3] [--batch-size 32]

Same random batch for all, default backbone with its bundled weights, 224 px:
  torch eager NCHW (what the plain loop does), torch channels_last (tlearn's torch
  backend), ONNX Runtime on the whole batch with intra-op threads = cores, and ONNX
  Runtime running single images concurrently, one per core (tlearn's default on CPU).
Interleaved repetitions; best and median images/s, and the largest difference of the
ONNX outputs from torch's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


def ips(fn, x, seconds: float) -> float:
    fn(x)  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t)


def _eager(net):
    import torch

    def run(x):
        with torch.inference_mode():
            return net(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="final;2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    args = ap.parse_args()
    info = bl.machine()
    bl.print_machine(info)

    import numpy as np
    import torch

    from tlearn.backbone.cut import FeatureNetwork, feature_network
    from tlearn.backbone.layers import list_layers
    from tlearn.backbone.weights import load_backbone
    from tlearn.core.spec import DEFAULT_MODEL, FINAL_LAYER
    from tlearn.core.system import cpu_cores
    from tlearn.runtime.export import cached_onnx
    from tlearn.runtime.ort import OnnxRuntime
    from tlearn.runtime.torch_runtime import TorchRuntime, example_input

    backbone = load_backbone(DEFAULT_MODEL, "auto")
    cl_backbone = load_backbone(DEFAULT_MODEL, "auto")  # its own channels_last copy
    cfg = backbone.data_config
    gflops = {li.name: li.gflops for li in list_layers(backbone.model)}
    cores = cpu_cores()
    print(f"batch {args.batch_size}, {cores} cores, torch threads {torch.get_num_threads()}")
    for layer in args.layers.split(";"):
        net, spec = feature_network(backbone, None if layer == "final" else layer, "avg")
        name = spec.layers[0]
        gf = max(gflops.values()) if name == FINAL_LAYER else gflops[name]
        x = example_input(cfg, args.batch_size, pixels=False, random=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = cached_onnx(net, spec, cfg, Path(tmp))
            cpu = torch.device("cpu")
            intra = OnnxRuntime(path, cpu, streams=1, threads=cores)
            dp = OnnxRuntime(path, cpu)  # tlearn's default
            with torch.inference_mode():
                ref = net(x).numpy()
            diff = max(float(np.abs(r(x) - ref).max()) for r in (intra, dp))

            cl_net = FeatureNetwork(cl_backbone.model, spec.layers, spec.pool).eval()
            cl_runtime = TorchRuntime(cl_net, cpu)  # channels_last
            ways = {
                "torch eager NCHW": _eager(net),
                "torch channels_last": cl_runtime,
                f"ONNX Runtime, batch on {cores} intra-op threads": intra,
                f"ONNX Runtime, single images on {cores} streams (tlearn)": dp,
            }
            res = {k: [] for k in ways}
            for _ in range(args.reps):
                for k, fn in ways.items():
                    res[k].append(ips(fn, x, args.seconds))
        print(f"\n== {name} ({gf:.3f} GFLOP/image), forward only, images/s (best / median)")
        base = max(res["torch eager NCHW"])
        for k, v in res.items():
            print(
                f"  {k:52s} {max(v):7.1f} / {bl.median(v):7.1f}   {max(v) / base:5.2f}x eager   "
                f"{gf * max(v):6.1f} GFLOP/s"
            )
        scale = float(np.abs(ref).max())
        print(f"  ONNX Runtime vs torch: max |diff| {diff:.2g} (features up to {scale:.3g})")


if __name__ == "__main__":
    main()
