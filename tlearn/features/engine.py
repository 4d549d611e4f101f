"""How features get computed for one cut: the one place that decides warm or cold, ONNX
Runtime or torch, for every command and every head (`open_engine`).

Warm runs compute features with no torch, timm or torchvision import at all. Starting
Python and importing torch and timm takes ~3-4 s on a small CPU (timm alone pulls in
torchvision, which imports torch._dynamo), more than extracting a few hundred images or
fitting an SVM on cached features. Everything a CPU run through ONNX Runtime needs from
them is remembered in the cache directory the first time (tlearn.cache.remembered):

- what a request (model, weights file, layer, pool) resolved to: the CutSpec and timm's
  data config;
- the PIL steps of that data config's eval transform;
- the exported graph of the cut (`onnx/`, see runtime.export.cached_onnx).

When all three are there, `extract`, `fit` (svm/logreg), `predict` and `evaluate` open
ONNX Runtime on the cached graph and decode with plain worker processes. The features
are the same bits as a cold run's: the same graph, the same pixels (data.pixels is tested
against timm's transform), the same feature cache. Anything else (a GPU, the torch
backend, hub weights, `--no-cache`) takes the cold path: load the backbone, cut it, and
open the backend runtime.device.choose_backend picks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tlearn.cache.remembered import (
    loaded_identity,
    recall_cut,
    recall_pixels,
    remember_cut,
    remember_layers,
    remember_pixels,
    request_key,
)
from tlearn.cache.store import FeatureStore, cache_root
from tlearn.core.errors import UsageError
from tlearn.core.hashing import file_sha256
from tlearn.core.options import RunOptions, check_device
from tlearn.core.spec import DEFAULT_MODEL, CutSpec, bundled_weights_file
from tlearn.core.stages import AUTOTUNE, Stages
from tlearn.core.system import cpu_only
from tlearn.data.imageset import Skipped
from tlearn.features.stream import FeatureBatch, Features, extract_array, iter_features
from tlearn.runtime.device import validate_decode
from tlearn.runtime.ort import (
    CpuDevice,
    LazyRuntime,
    OnnxRuntime,
    discard_graph,
    graph_intact,
    onnx_path,
    ort_installed,
)


@dataclass(frozen=True)
class CutRequest:
    """A cut as the user asked for it: resolved by loading the backbone (cold), or by
    what the cache remembers of an earlier run of the same request (warm)."""

    model: str = DEFAULT_MODEL
    weights: str = "auto"
    layers: object = None  # names, stage indices or "final"; a str or a sequence
    pool: str = "avg"
    seed: int = 0  # of a random init (--weights none)


@dataclass(frozen=True)
class SavedCut:
    """The cut of a saved model: its CutSpec and data config, exactly as fitted."""

    spec: CutSpec
    data_config: dict
    seed: int = 0


@dataclass
class Engine:
    """How features get computed for one cut: a lazily opened runtime and, unless disabled,
    the feature cache. Make one with `open_engine`."""

    spec: CutSpec
    data_config: dict
    runtime: LazyRuntime
    cache_root: Path | None
    draft: bool
    precision: str
    notes: list[str]
    network: object = None  # the torch feature network of a cold engine; None when warm
    view: str = "plain"  # or "hflip": features of the mirror images (see mirrored())
    stores: list = field(default_factory=list)
    decode: str = "cpu"  # where JPEGs are decoded: cpu or gpu (runtime.device.choose_decode)
    stages: Stages = field(default_factory=Stages)  # where the time goes

    def __post_init__(self) -> None:
        self.runtime.stages = self.stages

    def _open_store(self) -> FeatureStore:
        return FeatureStore.open(
            self.cache_root,
            self.spec,
            self.data_config,
            draft=self.draft,
            precision=self.precision,
            view=self.view,
            decoder=self.decode,
        )

    def mirrored(self) -> Engine:
        """The same engine for the mirror images (left-right flipped after the crop, as
        a flip of the network's input), cached under their own key."""
        # the same stores list: summary() counts the mirror images too
        return replace(self, runtime=MirroredRuntime(self.runtime), view="hflip")

    def _store(self) -> FeatureStore | None:
        if self.cache_root is None:
            return None
        store = self._open_store()
        self.notes.extend(store.notes)  # what opening it found (a damaged shard)
        store.notes = self.notes
        self.stores.append(store)
        return store

    def stream(
        self,
        paths: Sequence[str],
        run: RunOptions,
        *,
        stage: str,
        skipped: list[Skipped] | None = None,
    ) -> Iterator[FeatureBatch]:
        """Feature batches of `paths` in input order (features.stream.iter_features);
        unreadable images go to `skipped`."""
        return iter_features(
            self.runtime,
            paths,
            self.data_config,
            batch_size=run.batch_size,
            workers=run.workers,
            skipped=skipped,
            progress=run.bar(stage),
            cache=self._store(),
            draft=self.draft,
            decoder=self.decode,
            stages=self.stages,
        )

    def extract(self, paths: Sequence[str], run: RunOptions, *, stage: str) -> Features:
        """Features of every readable image of `paths`, in one array."""
        feats = extract_array(
            self.runtime,
            paths,
            self.data_config,
            batch_size=run.batch_size,
            workers=run.workers,
            progress=run.bar(stage),
            cache=self._store(),
            draft=self.draft,
            decoder=self.decode,
            stages=self.stages,
        )
        feats.notes = self.notes
        return feats

    def feature_dim(self) -> int:
        """Length of one feature vector: from the cache when it has this cut, else one
        zero image through the runtime (which a cold run opens anyway)."""
        if self.cache_root is not None and not self.runtime.opened:
            store = self._open_store()
            if store.dim is not None:
                return store.dim
        c, h, w = self.data_config["input_size"]
        if self.runtime.transform is not None:  # uint8 NHWC pixels
            x = np.zeros((1, h, w, c), dtype=np.uint8)
        else:
            # a float-input runtime is a torch one: torch is loaded already
            import torch

            x = torch.zeros(1, c, h, w)
        return int(self._untimed(x).shape[1])

    def _untimed(self, x):
        """The opened runtime on `x`, its time kept out of the run's stages (sizing the
        features and the warm-up are start-up, reported as such)."""
        runtime = self.runtime.open()
        stages = getattr(runtime, "stages", None)
        if stages is not None:
            runtime.stages = None
        try:
            return runtime(x)
        finally:
            if stages is not None:
                runtime.stages = stages

    def warm_up(self, run: RunOptions, images: int) -> None:
        """On CUDA, before a run computes `images` images: one batch of zeros at the run's
        batch size, so cuDNN picks its kernels (torch.backends.cudnn.benchmark) before the
        first image is read. The runtime pads smaller batches to that size, so it picks
        them once. Elsewhere nothing: there is nothing to tune."""
        if images <= 0 or getattr(self.runtime.device, "type", "cpu") != "cuda":
            return
        if self.runtime.transform is None:
            return  # float input: only the torch DataLoader path, which is left as it is
        c, h, w = self.data_config["input_size"]
        with self.stages.timed(AUTOTUNE):
            self._untimed(np.zeros((min(images, run.batch_size), h, w, c), np.uint8))

    def summary(self) -> dict:
        """backend that ran (None if every image came from the cache), images read from the
        cache and images computed, where JPEGs were decoded, and seconds per stage."""
        return {
            "backend": self.runtime.name,
            "device": str(self.runtime.device),
            "cached": sum(s.served for s in self.stores),
            "computed": self.runtime.images,
            "decode": self.decode,
            "stages": self.stages.to_dict(),
        }


class MirroredRuntime:
    """A runtime that flips each batch left-right first: uint8 NHWC pixels or float NCHW
    tensors (what the decoding workers hand over)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # device, transform, name, images, opened, open
        return getattr(self.inner, name)

    def __call__(self, x):
        if isinstance(x, np.ndarray):
            return self.inner(np.ascontiguousarray(x[:, :, ::-1, :]))
        return self.inner(x.flip(-1))


# ----------------------------------------------------------------------------- the choice


def open_engine(cut: CutRequest | SavedCut, run: RunOptions, *, backbone=None) -> Engine:
    """The engine for a cut: warm (the cached ONNX graph, no torch) when this run may be
    and the cache has all it needs, else cold (the backbone loaded, cut and run through
    the backend --backend/--device choose). `backbone`: an already loaded
    backbone.weights.Backbone (the sweep, `fit --layer auto`), which is always cold."""
    validate_decode(run.decode)
    if run.decode == "gpu" and cpu_only(run.device):
        raise UsageError(
            f"--decode gpu needs a CUDA device (--device {run.device} runs on the CPU here); "
            "use --decode cpu or auto"
        )
    check_device(run.device)  # a typo fails before the backbone loads
    notes: list[str] = []  # what the cache checks found (a damaged file), for both paths
    if backbone is None:
        warm = _warm_engine(cut, run, notes)
        if warm is not None:
            return warm
    return _cold_engine(cut, run, backbone, notes=notes)


def _warm_root(run: RunOptions) -> Path | None:
    """The cache root when `run` may take the warm path (--no-cache too: it is about the
    feature cache, not the exported graph)."""
    if run.backend not in ("auto", "onnx") or not cpu_only(run.device):
        return None
    if os.environ.get("TLEARN_NO_WARM") or not ort_installed():
        return None
    return cache_root()


def _warm_engine(cut: CutRequest | SavedCut, run: RunOptions, found_notes: list) -> Engine | None:
    root = _warm_root(run)
    if root is None:
        return None
    if isinstance(cut, CutRequest):
        key = request_key(cut.model, cut.weights, cut.layers, cut.pool, cut.seed)
        found = recall_cut(root, key, found_notes) if key is not None else None
        if found is None:
            return None
        spec, data_config = found
    else:
        if not _weights_unchanged(cut.spec):
            return None
        spec, data_config = cut.spec, cut.data_config
    pixels = recall_pixels(root, data_config, found_notes)
    if pixels is None:
        return None
    graph = onnx_path(root, spec, data_config, pixels=True)
    if not graph.is_file():
        return None
    if not graph_intact(graph):  # the cold path exports it again
        discard_graph(graph, found_notes)
        return None
    device = CpuDevice()
    steps = pixels[0]
    notes: list[str] = list(found_notes)
    saved = SavedCut(spec, data_config, cut.seed)

    def opener():
        try:
            return OnnxRuntime(graph, device, transform=steps)
        except Exception as e:  # a damaged cache file: rebuild it the cold way
            notes.append(
                f"cached ONNX graph {graph.name} could not be opened "
                f"({type(e).__name__}); exported it again"
            )
            with contextlib.suppress(OSError):
                graph.unlink()
            return _cold_engine(saved, RunOptions(device="cpu"), None, notes=notes).runtime.open()

    return Engine(
        spec=spec,
        data_config=data_config,
        runtime=LazyRuntime(opener, device, steps),
        cache_root=root if run.cache else None,
        draft=run.draft,
        precision="fp32",
        notes=notes,
    )


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


def _cold_engine(
    cut: CutRequest | SavedCut, run: RunOptions, backbone, notes: list[str] | None = None
) -> Engine:
    """Load (or take) the backbone, cut it, and open the chosen backend lazily. A request
    is remembered so that the next run of it can be warm."""
    # the cold path: torch, timm and the ONNX exporter
    from tlearn.backbone.cut import FeatureNetwork, feature_network
    from tlearn.backbone.layers import layer_names
    from tlearn.backbone.weights import backbone_for_spec, open_backbone
    from tlearn.runtime.device import choose_backend, choose_decode, precision, resolve_device
    from tlearn.runtime.export import open_runtime
    from tlearn.runtime.gpu_decode import gpu_decoder_available
    from tlearn.runtime.transforms import pixel_path

    remember = False
    loading = run.bar("load backbone")
    if loading is not None and backbone is None:
        loading(0, 0)  # a phase of seconds (timm's import, the weights): say so in logs
    if isinstance(cut, SavedCut):
        loaded = backbone_for_spec(cut.spec, seed=cut.seed)
        net = FeatureNetwork(loaded.model, cut.spec.layers, cut.spec.pool).eval()
        spec, data_config = cut.spec, cut.data_config
    else:
        remember = backbone is None
        loaded = backbone or open_backbone(cut.model, cut.weights, cut.seed)
        net, spec = feature_network(loaded, cut.layers, cut.pool)
        data_config = loaded.data_config
    dev = resolve_device(run.device)
    chosen = choose_backend(run.backend, dev)
    root = cache_root()  # exported graphs and resolved cuts; features only with run.cache
    notes = [] if notes is None else notes
    pixels = pixel_path(data_config)
    steps = pixels[0] if pixels else None
    decode = choose_decode(run.decode, dev.type, chosen, steps, gpu_decoder_available(dev))
    remember_pixels(root, data_config, pixels)
    remember_layers(root, layer_names(loaded.model, spec.model))  # --layer checks, no torch
    if remember:
        ident = loaded_identity(loaded.weights, cut.seed)
        if ident is not None:
            key = request_key(cut.model, cut.weights, cut.layers, cut.pool, cut.seed, ident)
            remember_cut(root, key, spec, data_config)

    def opener():
        preparing = run.bar("prepare the inference runtime")
        if preparing is not None:
            preparing(0, 0)  # exporting the ONNX graph the first time takes seconds
        return open_runtime(
            net,
            spec,
            data_config,
            backend=run.backend,
            device=dev,
            cache_root=root,
            notes=notes,
            pixels=pixels,
        )

    return Engine(
        network=net,
        spec=spec,
        data_config=data_config,
        runtime=LazyRuntime(opener, dev, pixels[0] if pixels else None),
        cache_root=root if run.cache else None,
        draft=run.draft,
        precision=precision(chosen, dev),
        notes=notes,
        decode=decode,
    )
