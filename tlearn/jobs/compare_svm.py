"""`fit --head linear|mlp --compare-svm`: after the network trains, a linear SVM on the
frozen pretrained features at the same cut is fitted (C by cross-validation on the
training images) and scored on the same validation images; the model directory keeps
whichever scores higher. The lecture's other transfer-learning route ("use a linear SVM
instead of the output layers") is then one of the candidates validation chooses from,
with the fine-tuned network at the other end: on a few hundred images the frozen features
often win (docs/benchmarks.md), on thousands fine-tuning does.

Ties keep the network: its validation accuracy is the best of its epochs (chosen on these
same images, so if anything it is flattered), while the SVM's C was chosen by
cross-validation on the training images only."""

from __future__ import annotations

from dataclasses import dataclass

from tlearn.core.options import RunOptions
from tlearn.heads.linear import LinearHead
from tlearn.heads.posthoc import fit_multiclass
from tlearn.jobs.sources import LabelledFeatures, save_fitted
from tlearn.report.metrics import classification_metrics
from tlearn.train.options import NNFitResult


@dataclass
class ProbeFeatures:
    """Frozen features at the run's cut for its training and validation images, the
    source that extracted them (spec, data config), and the --layer auto search if any."""

    train: LabelledFeatures
    valid: LabelledFeatures | None
    source: object  # jobs.sources.FeatureSource (or layer_auto.AutoLayerSource)
    sweep: object | None = None  # sweep.SweepResult


@dataclass
class ProbeSVM:
    """The SVM fitted on the probe's training features, and its validation metrics."""

    svm: LinearHead
    metrics: dict

    def score(self) -> dict:
        """What the run compares with (train.options.Settings.compared)."""
        return {
            "accuracy": self.metrics["accuracy"],
            "n_val": int(self.metrics["n_images"]),
            "C": self.svm.C_,
        }


def fit_svm(probe: ProbeFeatures, *, seed: int, run: RunOptions) -> ProbeSVM:
    """The linear SVM on the frozen training features (C by cross-validation), scored
    on the validation features. Fitted before the network trains, so the network's run
    can record both scores in config.json."""
    train, valid = probe.train, probe.valid
    svm = LinearHead(kind="svm", C=None, seed=seed, keep_oof=True, deadline=run.deadline)
    svm.fit(train.X, train.y, train.classes, progress=run.bar("compare: cross-validate C"))
    metrics = classification_metrics(valid.y, svm.predict(valid.X), train.classes)
    return ProbeSVM(svm=svm, metrics=metrics)


def keep_svm(
    res: NNFitResult, probe: ProbeFeatures, fitted: ProbeSVM, out_dir, *, seed: int, preset
) -> NNFitResult:
    """When the run's comparison kept the SVM: replace the network's model directory with
    the SVM's (one atomic swap), and report the SVM's validation metrics and calibration
    in `res`."""
    if not res.compared or res.compared["kept"] != "svm":
        return res
    train, valid = probe.train, probe.valid
    posthoc, notes = fit_multiclass(
        fitted.svm.oof_decision_,
        train.y,
        train.X,
        seed=seed,
        fitted_on="out-of-fold decisions of the cross-validation of C",
    )
    save_fitted(
        out_dir,
        probe.source,
        fitted.svm,
        train,
        valid,
        posthoc,
        fitted.metrics,
        probe.sweep,
        list(train.skipped) + list(valid.skipped),
        True,  # replaces the network's directory, written moments ago
        preset=preset,
        extra_config={"compared": res.compared},
    )
    res.val_metrics = fitted.metrics
    res.calibration = posthoc.to_config()
    res.tta = None
    res.warnings = res.warnings + [n for n in notes if n not in res.warnings]
    return res
