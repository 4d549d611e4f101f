"""Exporting the cut network to ONNX (cached per cut) and opening the backend a run uses:
ONNX Runtime on CPU, torch elsewhere.

Measured on a 2-core AVX2/AVX-512 machine (tf_efficientnet_lite0, 224 px, batch 32,
forward only): torch eager 30 img/s, torch channels_last 55, ONNX Runtime 189, with
outputs within 1e-5 of torch (docs/benchmarks.md, benchmarks/backends.py). So `auto`
means: ONNX Runtime on CPU (the cut network exported once and cached), torch with
channels_last and fp16 autocast on CUDA, torch on MPS. Training stays in torch; this
module only runs inference.

A runtime is a callable: a batch in, (B, D) float32 numpy features out. The batch is
either float32 NCHW, already normalised (what preprocess.eval_transform gives), or, when
the runtime has a `transform` (the pixel path), uint8 NHWC pixels that the runtime
normalises itself with the same float32 arithmetic (preprocess.split_eval_transform):
decoding workers then do less work and move 4x less data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tlearn.core.atomic import file_mode, write_json
from tlearn.core.cachedir import ensure_root
from tlearn.core.hashing import file_blake2b
from tlearn.core.system import dist_version
from tlearn.core.version import __version__
from tlearn.runtime.device import choose_backend
from tlearn.runtime.ort import (
    ONNX_OPSET,
    TMP_PREFIX,
    OnnxRuntime,
    discard_graph,
    graph_intact,
    onnx_key,
    onnx_path,
)
from tlearn.runtime.torch_runtime import PixelInput, TorchRuntime, example_input

# Exported graphs must reproduce torch this closely on a random batch, else torch is used.
EXPORT_ATOL = 1e-3


# ----------------------------------------------------------------------------- ONNX export


def export_onnx(net: torch.nn.Module, data_config: dict, path: str | Path, pixels=None) -> None:
    """Export the feature network with a dynamic batch axis (legacy TorchScript exporter:
    it needs no onnxscript) and check ONNX Runtime reproduces torch on a random batch.
    With `pixels` (transform, mean, std) the graph takes uint8 NHWC pixels."""
    import onnxruntime  # noqa: F401  (fail early, before spending time on the export)

    net = net.cpu().eval()
    if pixels is not None:
        net = PixelInput(net, pixels[1], pixels[2]).eval()
    example = example_input(data_config, 1, pixels is not None, random=True)
    # Tracing runs the real forward pass once: keep its output as the reference instead of
    # paying for another forward (a first forward in torch costs seconds on a small CPU).
    outputs: list[torch.Tensor] = []
    hook = net.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    hook.remove()
    if outputs:
        ref = outputs[0].float().numpy()
    else:  # an exporter that did not call forward: compute the reference
        with torch.inference_mode():
            ref = net(example).float().numpy()
    # Check at another batch size than the export's, so a batch size baked into the graph
    # (e.g. by a reshape) is caught here.
    check = OnnxRuntime(path, torch.device("cpu"), streams=1, threads=1)
    got = check(torch.cat([example, example]))
    ref = np.concatenate([ref, ref])
    if got.shape != ref.shape:
        raise RuntimeError(f"exported graph gives shape {got.shape}, torch {ref.shape}")
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if not diff <= EXPORT_ATOL * scale:
        raise RuntimeError(f"exported graph differs from torch by {diff:.2g}")


def cached_onnx(
    net: torch.nn.Module,
    spec,
    data_config: dict,
    cache_root: Path | None,
    pixels=None,
    notes: list[str] | None = None,
) -> Path:
    """The exported model for this cut, exporting it once into `cache_root`/onnx (atomic:
    export to a temporary name, then rename). Without a cache root, a temporary file."""
    if cache_root is None:
        tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        path = tmpdir / "model.onnx"
        try:
            export_onnx(net, data_config, path, pixels)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return path
    key = onnx_key(spec, data_config, pixels is not None)
    path = onnx_path(cache_root, spec, data_config, pixels is not None)
    folder = path.parent
    if path.is_file():
        if graph_intact(path):
            return path
        discard_graph(path, notes)  # damaged: never served, exported again below
    try:
        ensure_root(folder.parent)  # the cache root, marked as tlearn's
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unusable cache folder costs the export, never the run
        return cached_onnx(net, spec, data_config, None, pixels)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        export_onnx(net, data_config, tmp, pixels)
        os.chmod(tmp, file_mode())  # mkstemp made it 0600
        # the sidecar with the graph's digest first: a cached graph always has one
        write_json(
            path.with_suffix(".json"),
            {
                "key": key,
                "cut": spec.to_dict(),
                "input_size": list(data_config["input_size"]),
                "input": "uint8-nhwc" if pixels is not None else "float32-nchw",
                "opset": ONNX_OPSET,
                "torch": dist_version("torch"),
                "tlearn": __version__,
                "blake2b": file_blake2b(tmp),
            },
        )
        os.replace(tmp, path)
    except OSError:  # the cache could not keep it: use the export once, uncached
        return cached_onnx(net, spec, data_config, None, pixels)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------- opening


def open_runtime(
    net: torch.nn.Module,
    spec,
    data_config: dict,
    *,
    backend: str = "auto",
    device: torch.device,
    cache_root: Path | None,
    notes: list[str] | None = None,
    pixels=None,
) -> TorchRuntime | OnnxRuntime:
    """Open the chosen backend now. A failed ONNX export with `auto` falls back to torch
    with a one-line note; with an explicit `--backend onnx` too, since the features are
    the same (the note says why). `pixels`: see TorchRuntime."""
    chosen = choose_backend(backend, device)
    if chosen == "onnx":
        try:
            path = cached_onnx(net, spec, data_config, cache_root, pixels, notes)
            try:
                return OnnxRuntime(path, device, transform=pixels[0] if pixels else None)
            finally:
                if path.parent.name.startswith(TMP_PREFIX):  # not cached: remove
                    shutil.rmtree(path.parent, ignore_errors=True)
        except Exception as e:  # any exporter/ORT failure: torch computes the same features
            if notes is not None:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                notes.append(
                    f"ONNX export of {spec.model} at {','.join(spec.layers)} failed "
                    f"({type(e).__name__}: {msg[:120]}); using torch"
                )
    return TorchRuntime(net, device, pixels)
