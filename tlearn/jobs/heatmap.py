"""Class heatmaps: where in the image the model finds evidence for a class.

A linear head on average-pooled features is a 1x1 convolution: with the pooled vector
x = mean_hw F[:, h, w] and a head s = W x + b, the map S[:, h, w] = W F[:, h, w] + b has
mean_hw S = s exactly. So sliding the head's weights over the unpooled feature map at the
cut gives one score map per class whose average *is* the model's decision score (the
StandardScaler folds into W and b). This holds only for a linear head on avg pooling at a
single spatial cut; anything else is refused with a message rather than approximated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlearn.backbone.cut import CutNetwork, pool_maps
from tlearn.core.atomic import check_output_parent
from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import FINAL_LAYER
from tlearn.data.image import load_image
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import resize_target
from tlearn.data.scan import scan_inputs as scan_unlabeled
from tlearn.data.skipped import require_some_read
from tlearn.features.stream import extract_array
from tlearn.heads.linear import HEAD_KINDS, LinearHead
from tlearn.modeldir import SavedModel, load_model
from tlearn.report.plots import plot_heatmap
from tlearn.runtime.device import resolve_device
from tlearn.runtime.torch_runtime import TorchRuntime
from tlearn.runtime.transforms import eval_transform

# Heads saved as a torch nn.Linear on the pooled features (weight (K, D), bias (K,)):
# head type -> (weight tensor name, bias tensor name) in head.safetensors. The fine-tuning
# issue's `--head linear` plugs in here; an MLP is not linear and is refused.
# nnhead.NNHead("linear") is Sequential(Dropout, Linear): the Linear is layers.1.
TORCH_LINEAR_TENSORS: dict[str, tuple[str, str]] = {"linear": ("layers.1.weight", "layers.1.bias")}


@dataclass
class LinearMap:
    """A linear head acting on raw pooled features: scores = weight @ x + bias."""

    weight: np.ndarray  # (K, D) float32
    bias: np.ndarray  # (K,) float32


def fold_linear(weight, bias, mean=None, scale=None) -> LinearMap:
    """Fold a standardisation (x - mean) / scale into the head's weights, in float64."""
    W = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    if scale is not None:
        W = W / np.asarray(scale, dtype=np.float64)[None, :]
    if mean is not None:
        b = b - W @ np.asarray(mean, dtype=np.float64)
    return LinearMap(W.astype(np.float32), b.astype(np.float32))


def linear_map(saved: SavedModel) -> LinearMap:
    """The model's head as one (K, D) matrix and bias, or a UsageError when the head is
    not linear on the pooled features."""
    kind = saved.head_type
    if kind in HEAD_KINDS:
        head = LinearHead.from_saved(saved.config["head"], saved.tensors, saved.classes)
        return fold_linear(head.coef_, head.intercept_, head.mean_, head.scale_)
    if kind in TORCH_LINEAR_TENSORS:
        w_name, b_name = TORCH_LINEAR_TENSORS[kind]
        if w_name not in saved.tensors or b_name not in saved.tensors:
            raise ArtifactError(
                f"{saved.path}: a '{kind}' head needs tensors {w_name} and {b_name} for heatmaps"
            )
        return fold_linear(saved.tensors[w_name], saved.tensors[b_name])
    raise UsageError(
        f"heatmap needs a head that is linear on the pooled features (svm, logreg, linear); "
        f"this model's head is '{kind}', for which a 1x1-convolution map would not be exact. "
        "Fit a linear head (e.g. --head svm) to see class heatmaps"
    )


def check_cut(saved: SavedModel) -> str:
    """The single layer a heatmap can be taken at, or a UsageError saying why not."""
    cut = saved.cut
    if len(cut.layers) != 1:
        raise UsageError(
            f"heatmap needs a model cut at one layer; this one joins {','.join(cut.layers)}, "
            f"whose maps have different sizes. Refit with a single --layer "
            f"(e.g. --layer {cut.layers[-1]})"
        )
    if cut.pool != "avg":
        raise UsageError(
            f"heatmap needs --pool avg (only then is the map's mean the model's score); "
            f"this model uses --pool {cut.pool}. Refit with --pool avg"
        )
    return cut.layers[0]


class ScoreMapNetwork(nn.Module):
    """Cut network + the head as a 1x1 convolution: images in, (B, K, h, w) maps out."""

    def __init__(self, model: nn.Module, layer: str, lmap: LinearMap):
        super().__init__()
        self.cut = CutNetwork(model, [layer])
        self.register_buffer("weight", torch.from_numpy(lmap.weight)[:, :, None, None])
        self.register_buffer("bias", torch.from_numpy(lmap.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.cut(x)[0]
        return F.conv2d(fmap.float(), self.weight, self.bias)


def check_spatial(model: nn.Module, layer: str, data_config: dict) -> tuple[int, int]:
    """(h, w) of the map at `layer`; refuses token maps, and `final` when the model's own
    pooling is not a plain spatial average (then the map would not match the model)."""
    x = torch.randn(1, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fmap = CutNetwork(model, [layer]).eval()(x)[0]
        if fmap.ndim != 4:
            raise UsageError(
                f"heatmap needs a C x H x W feature map; layer '{layer}' gives shape "
                f"{tuple(fmap.shape[1:])} (tokens or vectors). Refit at a convolutional layer"
            )
        if layer == FINAL_LAYER:
            pooled = pool_maps(model, [layer], [fmap], "avg")[0]
            if pooled.shape != fmap.shape[:2] or not torch.allclose(
                pooled, fmap.mean((2, 3)), rtol=1e-4, atol=1e-5
            ):
                raise UsageError(
                    f"the model's own pooling after its last layer ({type(model).__name__}) is "
                    "not a plain average, so a heatmap at 'final' would not be exact; refit at "
                    "a named layer (see tlearn layers MODEL)"
                )
    return int(fmap.shape[2]), int(fmap.shape[3])


@dataclass
class HeatmapItem:
    path: str
    predicted: str
    score: float  # the model's score for the predicted class (probability or margin)
    shown: str  # the class whose map is drawn
    maps: np.ndarray  # (K, h, w) decision score maps at the cut, before upsampling
    decision: np.ndarray  # (K,) mean of each map = the head's decision score
    png: str | None = None

    def to_dict(self, classes: list[str]) -> dict:
        k = classes.index(self.shown)
        return {
            "path": self.path,
            "prediction": self.predicted,
            "score": self.score,
            "class": self.shown,
            "map_mean": float(self.decision[k]),
            "map_min": float(self.maps[k].min()),
            "map_max": float(self.maps[k].max()),
            "png": self.png,
        }


@dataclass
class HeatmapResult:
    items: list[HeatmapItem]
    classes: list[str]
    layer: str
    map_size: tuple[int, int]
    score_kind: str  # what `score` is: "probability" or "svm margin"
    decision_kind: str  # what the maps hold: "logit" or "svm margin"
    data_config: dict
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _softmax(d: np.ndarray) -> np.ndarray:
    e = np.exp(d - d.max())
    return e / e.sum()


def heatmaps(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    *,
    class_name: str | None = None,
    run: RunOptions | None = None,
) -> HeatmapResult:
    """Per-class score maps for each image (no files written; see write_heatmaps)."""
    run = run or RunOptions()
    saved = load_model(model_dir)
    lmap = linear_map(saved)
    layer = check_cut(saved)
    classes = saved.classes
    if class_name is not None and class_name not in classes:
        raise UsageError(
            f"--class '{class_name}' is not in the model; classes: {', '.join(classes)}"
        )
    # The weights the model predicts with: fine-tuned ones from the model directory if any.
    from tlearn.jobs.torch_scores import build_backbone

    model = build_backbone(saved)
    size = check_spatial(model, layer, saved.data_config)
    images = scan_unlabeled(list(inputs))
    if len(images) == 0 and not images.skipped:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    net = ScoreMapNetwork(model, layer, lmap).eval()
    feats = extract_array(
        TorchRuntime(net, resolve_device(run.device)),
        images.paths,
        saved.data_config,
        batch_size=run.batch_size,
        workers=run.workers,
        progress=run.bar("heatmap"),
    )
    skipped = list(images.skipped) + feats.skipped
    require_some_read(len(feats.indices), skipped, ", ".join(map(str, inputs)))
    # scores as predict reports them: calibrated probabilities when the model has a
    # calibration; else probabilities for logreg and neural heads (softmax of the maps'
    # means, which are their logits) and margins for an SVM
    posthoc = saved.posthoc
    calibrated = posthoc is not None and posthoc.calibrated and posthoc.task == "multi-class"
    probabilities = calibrated or saved.head_type != "svm"
    items = []
    for i, maps in zip(feats.indices, feats.X, strict=True):
        decision = maps.astype(np.float64).mean(axis=(1, 2))
        if calibrated:
            scores = posthoc.probabilities(decision[None])[0]
        else:
            scores = _softmax(decision) if probabilities else decision
        k = int(np.argmax(decision))
        items.append(
            HeatmapItem(
                path=images.paths[i],
                predicted=classes[k],
                score=float(scores[k]),
                shown=class_name or classes[k],
                maps=maps,
                decision=decision,
            )
        )
    return HeatmapResult(
        items=items,
        classes=classes,
        layer=layer,
        map_size=size,
        score_kind=(
            "calibrated probability"
            if calibrated
            else ("probability" if probabilities else "svm margin")
        ),
        decision_kind="logit" if saved.head_type != "svm" else "svm margin",
        data_config=saved.data_config,
        skipped=skipped,
        warnings=list(images.warnings),
    )


def model_input_image(path: str, data_config: dict) -> np.ndarray:
    """The image as the model saw it (resized, centre-cropped), as HxWx3 floats in [0, 1]."""
    img = load_image(path, min_size=resize_target(data_config))
    x = eval_transform(data_config)(img)
    mean = torch.tensor(data_config["mean"])[:, None, None]
    std = torch.tensor(data_config["std"])[:, None, None]
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _unique_png(out_dir: Path, path: str, used: set[str]) -> Path:
    stem = Path(path).stem or "image"
    name, n = f"{stem}.heatmap.png", 1
    while name in used:
        name, n = f"{stem}_{n}.heatmap.png", n + 1
    used.add(name)
    return out_dir / name


def write_heatmaps(result: HeatmapResult, out_dir: str | Path, alpha: float = 0.5) -> list[Path]:
    """One overlay PNG per image in out_dir; sets each item's `png`."""

    out_dir = Path(out_dir)
    check_output_parent(out_dir)
    out_dir.mkdir(exist_ok=True)
    used: set[str] = set()
    written = []
    for item in result.items:
        k = result.classes.index(item.shown)
        png = _unique_png(out_dir, item.path, used)
        title = (
            f"{Path(item.path).name}: predicted {item.predicted} "
            f"({result.score_kind} {item.score:.3f})"
        )
        if item.shown != item.predicted:
            title += f"; map for {item.shown}"
        label = (
            f"{result.decision_kind} for '{item.shown}' per location "
            f"(mean {item.decision[k]:.3f}) at {result.layer}"
        )
        image = model_input_image(item.path, result.data_config)
        plot_heatmap(image, item.maps[k], png, title, label, alpha=alpha)
        item.png = str(png)
        written.append(png)
    return written
