"""`tlearn export`: a saved model as one ONNX file that needs nothing but ONNX Runtime.

The graph (jobs.export_graph) takes a batch of uint8 RGB images (N, H, W, 3) at the
model's input size and returns `scores` (what `tlearn predict` reports) and, for models
with real probabilities, `probabilities`. Decoding, resizing and cropping stay outside
the graph; how to do them exactly as tlearn does is stored in the file's metadata
(`tlearn.preprocess`, see docs/onnx_example.py), with the class names, the score kind,
the tlearn version and the model directory's sha256.

At export time the graph is checked against tlearn's own scores (torch features, then
the head as predict applies it) on the --check images, or on synthetic ones: every score
within 1e-4 (relative to the largest score when that is above 1), else nothing is
written. `--quantize int8` quantizes the checked graph with ONNX Runtime's static
quantization (QDQ; int8 weights per channel, uint8 activations, ranges from the 99.999th
percentile over calibration images), and reports its size and its top-1 agreement with
the fp32 graph. Measured on real photos (docs/benchmarks.md): static quantization with
percentile ranges agreed on 99.3% of top-1 predictions, min-max ranges on 98.7%, and
weight-only (dynamic) quantization on 96.7% while running slower than fp32.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tlearn.core.atomic import atomic_file
from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.version import __version__
from tlearn.data.decode import decoded_batches
from tlearn.data.pixels import PilSteps, resize_target
from tlearn.data.scan import scan_inputs
from tlearn.jobs.export_graph import WholeModel
from tlearn.jobs.onnx_model import META_FORMAT, ONNX_MODEL_FORMAT, preprocess_doc
from tlearn.modeldir import load_model, model_sha256
from tlearn.runtime.ort import OnnxRuntime
from tlearn.runtime.transforms import pixel_path

OPSETS = range(13, 21)  # torch's TorchScript exporter writes opsets up to 20
QUANTIZE = ("int8",)
CHECK_ATOL = 1e-4
SYNTHETIC_IMAGES = 16
CALIBRATION_IMAGES = 32


@dataclass
class ExportResult:
    path: Path
    size: int  # bytes of the written file
    opset: int
    dynamic_batch: bool
    outputs: list[str]
    score_kind: str
    classes: list[str]
    check: dict  # images, where they came from, largest difference from tlearn's scores
    quantized: dict | None = None  # fp32 size, ratio, top-1 agreement with fp32
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def export_model(
    model_dir: str | Path,
    output: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    quantize: str | None = None,
    check: str | Path | None = None,
    calibration: str | Path | None = None,
    batch_size: int = 16,
) -> ExportResult:
    """Export MODEL_DIR to one ONNX file at `output` (written atomically, only once the
    graph reproduces tlearn's scores)."""
    t0 = time.perf_counter()
    if opset not in OPSETS:
        raise UsageError(f"--opset {opset}: use {OPSETS.start}..{OPSETS.stop - 1}, e.g. 17")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: allowed: {', '.join(QUANTIZE)}")
    saved = load_model(model_dir)
    pixels = pixel_path(saved.data_config)
    if pixels is None or not isinstance(pixels[0], PilSteps):
        raise ArtifactError(
            f"{model_dir}: its preprocessing is not a plain resize + centre crop + normalise, "
            "which the ONNX file's metadata can describe; export is not supported for it"
        )
    steps, mean, std = pixels
    whole = WholeModel(saved, mean, std).eval()
    notes: list[str] = []
    images, source = _check_images(check, steps, saved.data_config)
    outputs = list(whole.scoring.outputs)
    meta = _metadata(saved, steps, mean, std, whole, outputs)
    with tempfile.TemporaryDirectory(prefix="tlearn-export-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        _torch_export(whole, images[:2], fp32, outputs, opset, dynamic_batch)
        _add_metadata(fp32, meta)
        got, diff = _check_graph(whole, fp32, images, batch_size, dynamic_batch)
        result_file, quantized = fp32, None
        if quantize is not None:
            calib = _calibration_images(calibration, check, images, steps, saved, notes)
            result_file = Path(tmp) / "model.int8.onnx"
            _quantize(fp32, result_file, calib)
            _add_metadata(result_file, {**meta, "tlearn.quantization": "int8"})
            q = _run(result_file, images, batch_size, dynamic_batch)
            quantized = {
                "kind": quantize,
                "fp32_size": fp32.stat().st_size,
                "size_ratio": result_file.stat().st_size / fp32.stat().st_size,
                "top1_agreement": float(np.mean(q.argmax(1) == got.argmax(1))),
                "max_abs_diff": float(np.abs(q - got).max()),
                "images": len(images),
                "calibration_images": len(calib),
            }
        output = Path(output)
        with atomic_file(output, "wb") as f:
            f.write(result_file.read_bytes())
    return ExportResult(
        path=output,
        size=output.stat().st_size,
        opset=opset,
        dynamic_batch=dynamic_batch,
        outputs=outputs,
        score_kind=whole.scoring.score_kind,
        classes=saved.classes,
        check={"images": len(images), "source": source, "max_abs_diff": diff},
        quantized=quantized,
        metadata=meta,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def _metadata(saved, steps: PilSteps, mean, std, whole: WholeModel, outputs) -> dict:
    """The ONNX file's metadata_props (strings; JSON where structured)."""
    return {
        "tlearn.format": f"{ONNX_MODEL_FORMAT}/{META_FORMAT}",
        "tlearn.version": __version__,
        "tlearn.model_sha256": model_sha256(saved.path),
        "tlearn.classes": json.dumps(saved.classes),
        "tlearn.score_kind": whole.scoring.score_kind,
        "tlearn.outputs": json.dumps(outputs),
        "tlearn.preprocess": json.dumps(preprocess_doc(steps, mean, std, saved.data_config)),
        "tlearn.model": json.dumps(
            {
                "head": saved.head_type,
                "cut": saved.config["cut"],
                "trained_backbone": bool(saved.backbone is not None),
            }
        ),
    }


def _torch_export(whole, example: np.ndarray, path: Path, outputs, opset, dynamic) -> None:
    axes = {name: {0: "batch"} for name in ["images", *outputs]} if dynamic else None
    x = torch.from_numpy(np.ascontiguousarray(example[:1]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            whole,
            (x,),
            str(path),
            input_names=["images"],
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _add_metadata(path: Path, meta: dict) -> None:
    # onnx (a dependency of the exporter) edits the file's metadata_props
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, meta)
    model.producer_name, model.producer_version = "tlearn", __version__
    model.doc_string = (
        "tlearn model: uint8 RGB images (N, H, W, 3), resized and centre-cropped as "
        "metadata tlearn.preprocess says -> scores (see tlearn.score_kind)"
    )
    onnx.save(model, str(path))


def _run(path: Path, images: np.ndarray, batch_size: int, dynamic: bool) -> np.ndarray:
    """The graph's first output (`scores`) for every image."""
    runtime = OnnxRuntime(path, "cpu", streams=1)
    step = batch_size if dynamic else 1
    return np.concatenate([runtime(images[i : i + step]) for i in range(0, len(images), step)])


def _check_graph(whole, path: Path, images: np.ndarray, batch_size: int, dynamic: bool):
    """(the graph's scores, largest difference from tlearn's); refuses a graph that does
    not reproduce tlearn's scores."""
    got = _run(path, images, batch_size, dynamic)
    ref = np.concatenate(
        [
            whole.reference_scores(torch.from_numpy(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    )
    diff = float(np.abs(got - ref).max())
    if not diff <= CHECK_ATOL * max(1.0, float(np.abs(ref).max())):
        raise ArtifactError(
            f"the exported graph's scores differ from tlearn's by {diff:.2g} (more than "
            f"{CHECK_ATOL:g}); nothing written"
        )
    return got, diff


def _decode(folder, steps: PilSteps, data_config: dict, what: str, limit: int | None = None):
    images = scan_inputs([folder])
    paths = images.paths
    if limit is not None and len(paths) > limit:  # evenly over the (class-sorted) list
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    batches = decoded_batches(
        paths, steps, batch_size=32, workers=0, min_size=resize_target(data_config), keyed=False
    )
    arrays = [b[1] for b in batches if b[1] is not None]
    if not arrays:
        raise DataError(f"{what} {folder}: no readable images")
    return np.concatenate(arrays)


def _check_images(check, steps: PilSteps, data_config: dict):
    if check is not None:
        return _decode(check, steps, data_config, "--check"), str(check)
    return synthetic_images(SYNTHETIC_IMAGES, steps.crop), "synthetic"


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (colour blobs and gradients rather than pixel noise,
    so the network's activations look more like those of photos)."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.uniform(0, 255, (n, 6, 6, 3)).astype(np.float32)
    ys = np.linspace(0, 5, h).astype(np.float32)
    xs = np.linspace(0, 5, w).astype(np.float32)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 5), np.minimum(x0 + 1, 5)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = coarse[:, y0][:, :, x0] * (1 - fx) + coarse[:, y0][:, :, x1] * fx
    bottom = coarse[:, y1][:, :, x0] * (1 - fx) + coarse[:, y1][:, :, x1] * fx
    img = top * (1 - fy) + bottom * fy + rng.normal(0, 8, (n, h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _calibration_images(calibration, check, images, steps, saved, notes: list[str]):
    if calibration is not None:
        return _decode(calibration, steps, saved.data_config, "--calibration", CALIBRATION_IMAGES)
    if check is not None:
        notes.append(
            "int8 ranges calibrated on the --check images: the agreement reported is on the "
            "images it was calibrated with; give --calibration DIR (e.g. training images)"
        )
        return images[:CALIBRATION_IMAGES]
    notes.append(
        "int8 ranges calibrated on synthetic images; give --calibration DIR with some "
        "training images for a better int8 model, and --check DIR to measure it"
    )
    return images


def _quantize(src: Path, dst: Path, calib: np.ndarray) -> None:
    # ONNX Runtime's quantization tools: only `export --quantize` needs them
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    # (the same tools' shape inference, run before quantizing)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            # one image a run: the percentile calibrator needs batches of one shape
            self.batches = iter(calib[i : i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"images": x}

    pre = dst.with_suffix(".pre.onnx")
    # the quantization tools print progress and log warnings: the library prints nothing
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
        _quiet_logging(),
    ):
        warnings.simplefilter("ignore")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile,
        )


@contextlib.contextmanager
def _quiet_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
