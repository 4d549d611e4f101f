"""Warm runs: compute features with no torch, timm or torchvision import at all.

Starting Python and importing torch and timm takes ~3-4 s on a small CPU (timm alone pulls
in torchvision, which imports torch._dynamo), more than extracting a few hundred images
or fitting an SVM on cached features. Everything a CPU run through ONNX Runtime needs
from them is remembered in the cache directory the first time:

- what a request (model, weights file, layer, pool) resolved to: the CutSpec and timm's
  data config (`resolved/cut-<key>.json`);
- the PIL steps of that data config's eval transform (`resolved/pixels-<key>.json`);
- the exported graph of the cut (`onnx/`, see tlearn.runtime.cached_onnx).

When all three are there, `extract`, `fit` (svm/logreg), `predict` and `evaluate` open
ONNX Runtime on the cached graph and decode with plain worker processes. The features
are the same bits as a cold run's: the same graph, the same pixels (tlearn.pixels is
tested against timm's transform), the same feature cache. Anything else (a GPU, the
torch backend, hub weights, `--no-cache`) takes the ordinary path.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tlearn.core.hashing import doc_sha256, file_sha256
from tlearn.core.spec import BUNDLED_WEIGHTS, CutSpec, bundled_weights_file
from tlearn.core.system import cpu_only
from tlearn.core.version import __version__

FORMAT = 1


def _versions() -> dict:
    from tlearn.core.system import dist_version

    return {name: dist_version(name) for name in ("timm", "torch", "torchvision")} | {
        "tlearn": __version__
    }


def weights_identity(model: str, weights: str, seed: int) -> dict | None:
    """What the weights of a request are, without loading them; None when only loading
    can tell (timm's hub weights)."""
    if weights == "none":  # random init: a function of the seed and the versions
        return {"source": "none", "seed": int(seed)}
    if weights == "auto":
        path = bundled_weights_file(model)
        if path is None:
            return None
        return {"source": f"bundled:{BUNDLED_WEIGHTS[model]}", "sha256": file_sha256(path)}
    path = Path(weights).expanduser()
    if not path.is_file():
        return None  # the ordinary path words the error
    return {"source": str(path.resolve()), "sha256": file_sha256(path)}


def loaded_identity(loaded, seed: int) -> dict | None:
    """weights_identity from a loaded backbone's backbone.Weights (already hashed), so a
    cold run does not read the weights file a second time."""
    if loaded.source == "none":
        return {"source": "none", "seed": int(seed)}
    if loaded.source.startswith("timm:"):
        return None
    return {"source": loaded.source, "sha256": loaded.sha256}


def request_key(
    model: str, weights: str, layers, pool: str, seed: int, identity: dict | None = None
) -> str | None:
    """The key a request's resolved cut is remembered under; `identity`: its
    weights_identity when already known."""
    ident = identity if identity is not None else weights_identity(model, weights, seed)
    if ident is None:
        return None
    if not isinstance(layers, (str, type(None))):
        layers = list(layers)
    doc = {"format": FORMAT, "model": model, "weights": ident, "layers": layers, "pool": pool}
    return doc_sha256({**doc, "versions": _versions()})


def pixels_key(data_config: dict) -> str:
    return doc_sha256({"format": FORMAT, "data_config": data_config, "versions": _versions()})


def _folder(root: Path) -> Path:
    return Path(root) / "resolved"


def _write(path: Path, doc: dict) -> None:
    from tlearn.core.atomic import write_json

    with contextlib.suppress(OSError):  # the cache only ever saves time
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, doc)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remember_cut(root: Path | None, key: str | None, spec: CutSpec, data_config: dict) -> None:
    if root is not None and key is not None:
        doc = {"spec": spec.to_dict(), "data_config": data_config}
        _write(_folder(root) / f"cut-{key}.json", doc)


def remember_pixels(root: Path | None, data_config: dict, pixels) -> None:
    """`pixels`: preprocess.split_eval_transform's (transform, mean, std) or None."""
    from tlearn.data.pixels import PilSteps

    if root is None or pixels is None or not isinstance(pixels[0], PilSteps):
        return
    doc = {"steps": pixels[0].to_dict(), "mean": pixels[1], "std": pixels[2]}
    path = _folder(root) / f"pixels-{pixels_key(data_config)}.json"
    if not path.is_file():
        _write(path, doc)


def recall_cut(root: Path, key: str) -> tuple[CutSpec, dict] | None:
    doc = _read(_folder(root) / f"cut-{key}.json")
    try:
        return CutSpec.from_dict(doc["spec"]), doc["data_config"]
    except (KeyError, TypeError, ValueError):
        return None


def recall_pixels(root: Path, data_config: dict):
    from tlearn.data.pixels import PilSteps

    doc = _read(_folder(root) / f"pixels-{pixels_key(data_config)}.json")
    try:
        return PilSteps.from_dict(doc["steps"]), doc["mean"], doc["std"]
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Warm:
    """A cut that can run with no torch import."""

    spec: CutSpec
    data_config: dict
    onnx: Path
    pixels: tuple
    seed: int = 0  # of a random init (--weights none), for the fallback below


def _warm(root: Path, spec: CutSpec, data_config: dict) -> Warm | None:
    from tlearn.runtime.ort import onnx_path

    pixels = recall_pixels(root, data_config)
    if pixels is None:
        return None
    path = onnx_path(root, spec, data_config, pixels=True)
    return Warm(spec, data_config, path, pixels) if path.is_file() else None


def _usable(run) -> Path | None:
    """The cache root when `run` (pipeline.RunOptions) may take the warm path."""
    from tlearn.runtime.ort import ort_installed

    if not run.cache or run.backend not in ("auto", "onnx") or not cpu_only(run.device):
        return None
    if os.environ.get("TLEARN_NO_WARM") or not ort_installed():
        return None
    from tlearn.cache import cache_root

    return cache_root()


def for_request(model: str, weights: str, layers, pool: str, seed: int, run) -> Warm | None:
    root = _usable(run)
    if root is None:
        return None
    key = request_key(model, weights, layers, pool, seed)
    found = recall_cut(root, key) if key is not None else None
    warm = _warm(root, *found) if found is not None else None
    if warm is not None:
        warm.seed = seed
    return warm


def _weights_unchanged(spec: CutSpec) -> bool:
    """The weights a saved model names are still there with the same sha256. The cached
    graph (keyed by that sha256) would compute the right features either way, but a model
    whose weights are gone or changed must fail the same way warm or cold."""
    src = spec.weights_source
    if src == "none":
        return True
    if src.startswith("bundled:"):
        path = bundled_weights_file(spec.model)
    elif src.startswith("timm:"):
        return False  # hub weights: only loading them tells
    else:
        path = Path(src)
    return path is not None and path.is_file() and file_sha256(path) == spec.weights_sha256


def for_spec(spec: CutSpec, data_config: dict, run) -> Warm | None:
    """For a saved model (predict, evaluate)."""
    root = _usable(run)
    if root is None or not _weights_unchanged(spec):
        return None
    return _warm(root, spec, data_config)


def engine(warm: Warm, run):
    """An Engine (tlearn.engine) running the cached graph on the CPU."""
    from tlearn.cache import cache_root
    from tlearn.engine import Engine
    from tlearn.runtime.ort import CpuDevice, LazyRuntime, OnnxRuntime

    device = CpuDevice()
    steps = warm.pixels[0]
    notes: list[str] = []

    def opener():
        try:
            return OnnxRuntime(warm.onnx, device, transform=steps)
        except Exception as e:  # a damaged cache file: rebuild it the cold way
            notes.append(
                f"cached ONNX graph {warm.onnx.name} could not be opened "
                f"({type(e).__name__}); exported it again"
            )
            with contextlib.suppress(OSError):
                warm.onnx.unlink()
            return _cold_runtime(warm, notes)

    return Engine(
        net=None,
        spec=warm.spec,
        data_config=warm.data_config,
        runtime=LazyRuntime(opener, device, steps),
        cache_root=cache_root(),
        draft=run.draft,
        precision="fp32",
        notes=notes,
    )


def _cold_runtime(warm: Warm, notes: list[str]):
    """The runtime a cold run would open for this cut (imports torch)."""
    import torch

    from tlearn.backbone.cut import FeatureNetwork
    from tlearn.backbone.weights import backbone_for_spec
    from tlearn.cache import cache_root
    from tlearn.runtime.export import open_runtime
    from tlearn.runtime.transforms import pixel_path

    backbone = backbone_for_spec(warm.spec, seed=warm.seed)
    net = FeatureNetwork(backbone.model, warm.spec.layers, warm.spec.pool).eval()
    return open_runtime(
        net,
        warm.spec,
        warm.data_config,
        device=torch.device("cpu"),
        cache_root=cache_root(),
        notes=notes,
        pixels=pixel_path(warm.data_config),
    )
