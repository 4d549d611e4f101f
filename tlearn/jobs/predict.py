"""`tlearn predict`: the class of each image (or feature row) with its score, its
calibrated probability, its prediction set (--coverage) and whether it is unlike the
training images ("unknown"; --reject); a multi-label model's set of labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.core.errors import DataError, UsageError
from tlearn.core.options import RunOptions
from tlearn.core.spec import CutSpec
from tlearn.data.imageset import Skipped
from tlearn.data.scan import scan_inputs as scan_unlabeled
from tlearn.data.skipped import require_some_read, strict_failure
from tlearn.features.table import is_features_table, read_table
from tlearn.jobs.decide import Decisions, Prediction, check_requests, decide
from tlearn.jobs.onnx_model import OnnxScores, is_onnx_model, onnx_scores
from tlearn.jobs.score import (
    ModelScorer,
    refuse_nonfinite,
    refuse_nonfinite_outputs,
    refuse_tta_on_features,
    score_features,
    score_images,
)
from tlearn.modeldir import load_model
from tlearn.scale.shard import Shard, plan_part

__all__ = ["Prediction", "PredictResult", "predict", "onnx_prediction"]

# ----------------------------------------------------------------------------- predict


@dataclass
class PredictResult:
    predictions: list[Prediction]
    classes: list[str]
    score_kind: str  # "probability" or "svm margin"
    skipped: list[Skipped]
    warnings: list[str]
    part: dict | None = None  # with a shard: what tlearn.shard writes in the part's sidecar
    decisions: Decisions = field(default_factory=Decisions)  # which columns there are


def predict(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    *,
    strict: bool = False,
    tta: str | None = None,
    run: RunOptions | None = None,
    shard: Shard | None = None,
    coverage: float | None = None,
    reject: bool = False,
) -> PredictResult:
    run = run or RunOptions()
    if is_onnx_model(model_dir):  # a whole model exported by tlearn export (jobs.onnx_model)
        if coverage is not None or reject:
            raise UsageError(
                "--coverage and --reject need the model directory (an exported .onnx holds "
                "scores and probabilities only)"
            )
        scored = onnx_scores(model_dir, inputs, tta=tta or "none", run=run, shard=shard)
        return onnx_prediction(scored, strict, model_dir)
    saved = load_model(model_dir)
    scorer = ModelScorer(saved)
    notes = check_requests(scorer, coverage, reject)
    table_input = len(inputs) == 1 and is_features_table(inputs[0])
    tta = tta or ("none" if table_input else saved.tta)  # None: the model's own choice
    part, n_scan_skipped = None, 0
    if len(inputs) == 1 and is_features_table(inputs[0]):
        table = read_table(inputs[0])
        if CutSpec.from_dict(table.meta["cut"]) != saved.cut:
            raise DataError(f"{inputs[0]} was extracted with another cut than the model's")
        refuse_tta_on_features(tta)
        paths, X, skipped, warnings = table.paths, table.X, [], list(table.warnings)
        if shard is not None:
            part = plan_part(shard, paths, None, [], run.batch_size)
            paths, X = paths[part.start : part.stop], X[part.start : part.stop]
        outputs = score_features(scorer, X, run.batch_size)
    else:
        images = scan_unlabeled(list(inputs))
        if len(images) == 0 and not images.skipped:
            raise DataError(f"no images found in {', '.join(map(str, inputs))}")
        n_scan_skipped = len(images.skipped)
        if shard is not None:
            part = plan_part(shard, images.paths, None, images.skipped, run.batch_size)
            images = images.subset(range(part.start, part.stop))
        scored = score_images(scorer, images, tta, run, "predict")
        paths = [images.paths[i] for i in scored.indices]
        outputs, skipped = scored.outputs, images.skipped + scored.skipped
        warnings = list(images.warnings) + scored.notes
    if strict and skipped:
        raise strict_failure(skipped)
    if shard is None:  # a shard may hold no readable image while the others do
        require_some_read(len(paths), skipped, ", ".join(map(str, inputs)))
    outputs = refuse_nonfinite_outputs(outputs, paths, model_dir)
    preds, decisions = decide(paths, outputs, scorer, coverage=coverage, reject=reject)
    return PredictResult(
        predictions=preds,
        classes=saved.classes,
        score_kind=scorer.kind,
        skipped=skipped,
        warnings=list(warnings) + notes,
        part=None if part is None else part.info(skipped[n_scan_skipped:]),
        decisions=decisions,
    )


def onnx_prediction(scored: OnnxScores, strict: bool, model=None) -> PredictResult:
    """The PredictResult of an exported .onnx model's scores (jobs.onnx_model)."""
    if strict and scored.skipped:
        raise strict_failure(scored.skipped)
    if scored.part is None:
        require_some_read(len(scored.paths), scored.skipped, "the inputs")
    refuse_nonfinite(scored.scores, scored.paths, model or "the model")
    preds = [
        Prediction(
            path=p,
            label=scored.classes[int(s.argmax())],
            score=float(s.max()),
            scores={c: float(v) for c, v in zip(scored.classes, s, strict=True)},
        )
        for p, s in zip(scored.paths, scored.scores, strict=True)
    ]
    part = scored.part
    return PredictResult(
        predictions=preds,
        classes=scored.classes,
        score_kind=scored.score_kind,
        skipped=scored.skipped,
        warnings=scored.warnings,
        part=None if part is None else part.info(scored.skipped[scored.n_scan_skipped :]),
    )
