"""Models exported by `tlearn export`: what their metadata says, and predicting with
them (`tlearn predict model.onnx IMAGES`) through ONNX Runtime alone, without torch.

The images are decoded and cropped exactly as the metadata's `tlearn.preprocess` says,
by the same decoding workers as every other command (JPEG draft, EXIF rotation,
transparency on white, then data.pixels.PilSteps), so the scores are those of
`tlearn predict MODEL_DIR` on the same images, up to float rounding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.data.decode import decoded_batches, default_workers
from tlearn.data.imageset import Skipped
from tlearn.data.pixels import RESAMPLE, PilSteps, resize_target
from tlearn.data.scan import scan_inputs
from tlearn.runtime.ort import CpuDevice, OnnxRuntime, ort_installed
from tlearn.scale.shard import Shard, plan_part

ONNX_MODEL_FORMAT = "tlearn-onnx"
META_FORMAT = 1  # bump when the metadata's keys or meaning change


def is_onnx_model(path) -> bool:
    """A file (not a model directory) named *.onnx."""
    p = Path(path)
    return p.suffix.lower() == ".onnx" and not p.is_dir()


def preprocess_doc(steps: PilSteps, mean, std, data_config: dict) -> dict:
    """How to turn an image file into the graph's input, as stored in the metadata."""
    return {
        "input": "images: uint8 RGB, shape (N, crop[0], crop[1], 3)",
        "decode": {
            "jpeg_draft_min_size": resize_target(data_config),
            "exif_transpose": True,
            "transparency": "composited on white",
        },
        "resize": list(steps.resize),  # [shorter side] or [height, width]
        "max_size": steps.max_size,
        "interpolation": steps.interpolation,
        "crop": list(steps.crop),
        "crop_rounding": "centre crop, offsets round((size - crop) / 2)",
        "mean": [float(v) for v in data_config.get("mean", mean)],
        "std": [float(v) for v in data_config.get("std", std)],
        "normalisation": "in the graph: (pixels / 255 - mean) / std",
    }


@dataclass
class OnnxModel:
    """An exported model file, its metadata validated."""

    path: Path
    classes: list[str]
    score_kind: str
    outputs: list[str]
    steps: PilSteps
    min_size: int
    meta: dict = field(default_factory=dict)


def read_onnx_model(path, runtime: OnnxRuntime) -> OnnxModel:
    """The metadata of an opened exported model, or ArtifactError naming what is wrong."""
    meta = dict(runtime.session.get_modelmeta().custom_metadata_map)
    fmt = meta.get("tlearn.format", "")
    if not fmt.startswith(f"{ONNX_MODEL_FORMAT}/"):
        raise ArtifactError(
            f"{path}: not a model exported by tlearn export (no tlearn.format metadata)"
        )
    if fmt != f"{ONNX_MODEL_FORMAT}/{META_FORMAT}":
        raise ArtifactError(f"{path}: metadata format {fmt} is not supported; export it again")
    try:
        classes = json.loads(meta["tlearn.classes"])
        outputs = json.loads(meta["tlearn.outputs"])
        pre = json.loads(meta["tlearn.preprocess"])
        steps = PilSteps.from_dict(pre)
        min_size = int(pre["decode"]["jpeg_draft_min_size"])
        kind = meta["tlearn.score_kind"]
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(
            f"{path}: damaged tlearn metadata ({type(e).__name__}: {e}); export it again"
        ) from None
    names = [o.name for o in runtime.session.get_outputs()]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or names[:1] != ["scores"]
        or min_size < 1
        or min(steps.crop) < 1
        or min(steps.resize) < 1
        or steps.interpolation not in RESAMPLE
        or kind not in ("probability", "svm margin")
    ):
        raise ArtifactError(f"{path}: metadata does not match the graph; export it again")
    return OnnxModel(Path(path), classes, kind, outputs, steps, min_size, meta)


@dataclass
class OnnxScores:
    """Scores of an exported model for every readable input image."""

    paths: list[str]
    scores: np.ndarray
    classes: list[str]
    score_kind: str
    skipped: list[Skipped]
    warnings: list[str]
    part: object = None  # scale.shard.PartPlan with a shard
    n_scan_skipped: int = 0


def onnx_scores(
    model_path,
    inputs: Sequence,
    *,
    tta: str = "none",
    run: RunOptions | None = None,
    shard: Shard | None = None,
) -> OnnxScores:
    """Scores of the exported model for the images in `inputs` (files and folders)."""
    run = run or RunOptions()
    if tta != "none":
        raise UsageError(f"--tta {tta} needs a model directory; an exported .onnx takes none")
    if not Path(model_path).is_file():
        raise ArtifactError(f"model file {model_path} does not exist")
    if not ort_installed():
        raise ArtifactError("predicting with a .onnx file needs onnxruntime (pip install it)")
    if len(inputs) == 1 and str(inputs[0]).lower().endswith(".csv"):
        raise UsageError("an exported .onnx model takes images, not a features CSV")
    try:
        runtime = OnnxRuntime(model_path, CpuDevice())
    except Exception as e:  # onnxruntime's own errors for a damaged or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(f"{model_path}: not a loadable ONNX model ({first})") from None
    model = read_onnx_model(model_path, runtime)
    images = scan_inputs(list(inputs))
    n_scan_skipped, part = len(images.skipped), None
    if shard is not None:
        part = plan_part(shard, images.paths, None, images.skipped, run.batch_size)
        images = images.subset(range(part.start, part.stop))
    paths, skipped = images.paths, list(images.skipped)
    fixed = runtime.session.get_inputs()[0].shape[0] == 1  # exported with a static batch
    workers = default_workers(len(paths), run.batch_size) if run.workers is None else run.workers
    done, idx, parts = 0, [], []
    bar = run.bar("predict")
    for batch_idx, x, bad, _ in decoded_batches(
        paths, model.steps, batch_size=run.batch_size, workers=workers,
        min_size=model.min_size, keyed=False,
    ):  # fmt: skip
        skipped += [Skipped(paths[i], reason) for i, reason in bad]
        if x is not None:
            parts.append(_run(runtime, x, fixed))
            idx += batch_idx
        done += len(batch_idx) + len(bad)
        if bar is not None:
            bar(done, len(paths))
    runtime.close()
    if not idx and not skipped:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    scores = np.concatenate(parts) if parts else np.zeros((0, len(model.classes)))
    return OnnxScores(
        paths=[paths[i] for i in idx],
        scores=scores,
        classes=model.classes,
        score_kind=model.score_kind,
        skipped=skipped,
        warnings=list(images.warnings),
        part=part,
        n_scan_skipped=n_scan_skipped,
    )


def _run(runtime: OnnxRuntime, x: np.ndarray, fixed: bool) -> np.ndarray:
    if fixed and len(x) > 1:  # a graph exported with --static-batch takes one image a run
        return np.concatenate([_run(runtime, x[i : i + 1], False) for i in range(len(x))])
    return np.asarray(runtime(x), dtype=np.float64)
