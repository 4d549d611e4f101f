"""Calibration, conformal sets, the "unknown" scorer and multi-label metrics on
synthetic data with known answers (heads.calibration, heads.conformal, heads.ood,
heads.multilabel, heads.posthoc, report.calibration, report.multilabel)."""

from __future__ import annotations

import numpy as np
import pytest

from tlearn.core.errors import ArtifactError, DataError, UsageError
from tlearn.core.labelsets import parse_label_set
from tlearn.heads.calibration import (
    fit_platt,
    fit_temperature,
    platt_probabilities,
    temperature_probabilities,
)
from tlearn.heads.conformal import (
    check_coverage,
    nonconformity,
    prediction_sets,
    quantile,
    set_metrics,
)
from tlearn.heads.multilabel import (
    MultiLabelLinear,
    average_precision,
    best_f1_thresholds,
    label_matrix,
)
from tlearn.heads.neural import softmax
from tlearn.heads.ood import fit_knn_ood
from tlearn.heads.posthoc import PostHoc, fit_multiclass, fit_multilabel
from tlearn.report.calibration import multiclass_calibration
from tlearn.report.multilabel import multilabel_metrics


def _draw(rng, n: int, k: int = 3, scale: float = 2.0):
    """True logits and labels drawn from softmax(logits): the logits' softmax is the
    exact class probability."""
    z = rng.normal(0, scale, (n, k))
    p = softmax(z)
    y = np.asarray([rng.choice(k, p=row) for row in p])
    return z, y


def _nll(P, y):
    return float(-np.mean(np.log(P[np.arange(len(y)), y])))


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("factor", [0.2, 5.0])  # under- and over-confident scores
def test_temperature_scaling_undoes_a_known_miscalibration_and_improves_nll(factor):
    rng = np.random.default_rng(0)
    z_cal, y_cal = _draw(rng, 3000)
    z_test, y_test = _draw(rng, 3000)
    t = fit_temperature(z_cal * factor, y_cal)
    assert t == pytest.approx(factor, rel=0.1)
    before = _nll(softmax(z_test * factor), y_test)
    after = _nll(temperature_probabilities(z_test * factor, t), y_test)
    best = _nll(softmax(z_test), y_test)
    assert after < before - 0.05
    assert after == pytest.approx(best, abs=0.01)
    # the winning class never changes
    P = temperature_probabilities(z_test * factor, t)
    assert np.array_equal(P.argmax(1), z_test.argmax(1))
    assert np.allclose(P.sum(1), 1.0, atol=1e-12)


def test_temperature_stays_finite_when_held_out_decisions_are_separable():
    y = np.repeat([0, 1, 2], 20)
    D = np.eye(3)[y] * 3.0  # every row right, with a margin
    t = fit_temperature(D, y)
    assert 0 < t < 100
    P = temperature_probabilities(D, t)
    assert P.max() < 1.0  # not exactly 0/1: a later mistake stays finite in NLL


def test_platt_recovers_a_known_sigmoid():
    rng = np.random.default_rng(1)
    d = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(1.5 * d - 0.7)))
    a, b = fit_platt(d, y)
    assert a == pytest.approx(1.5, abs=0.1)
    assert b == pytest.approx(-0.7, abs=0.1)
    P = platt_probabilities(d[:, None], np.array([a]), np.array([b]))
    assert P.shape == (20000, 1) and 0 < P.min() and P.max() < 1


def test_calibration_metrics_of_perfect_and_overconfident_probabilities():
    rng = np.random.default_rng(2)
    z, y = _draw(rng, 20000)
    good = multiclass_calibration(softmax(z), y)
    bad = multiclass_calibration(softmax(4 * z), y)
    assert good["ece"] < 0.02 < bad["ece"]
    assert good["nll"] < bad["nll"] and good["brier"] < bad["brier"]
    # hand-checked: two images, one right at 0.8, one wrong at 0.6 (one bin each)
    m = multiclass_calibration(np.array([[0.8, 0.2], [0.6, 0.4]]), np.array([0, 1]))
    assert m["ece"] == pytest.approx(0.5 * 0.2 + 0.5 * 0.6)
    assert m["brier"] == pytest.approx(((0.2**2 + 0.2**2) + (0.6**2 + 0.6**2)) / 2)
    assert m["nll"] == pytest.approx(-(np.log(0.8) + np.log(0.4)) / 2)


# ----------------------------------------------------------------------------- conformal


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_conformal_sets_cover_the_true_class_at_the_requested_rate(coverage):
    rng = np.random.default_rng(3)
    z_cal, y_cal = _draw(rng, 2000, k=5)
    z_test, y_test = _draw(rng, 20000, k=5)
    scores = nonconformity(softmax(z_cal), y_cal)
    q = quantile(scores, coverage)
    sets = prediction_sets(softmax(z_test), q)
    m = set_metrics(sets, y_test, [f"c{i}" for i in range(5)])
    # exchangeable data: coverage >= the level (up to sampling), and not much above it
    assert coverage - 0.01 <= m["coverage"] <= coverage + 0.02
    assert 0 < m["mean_set_size"] < 5
    assert set(m["per_class"]) == {f"c{i}" for i in range(5)}


def test_conformal_quantile_is_the_finite_sample_rank():
    s = np.linspace(0.0, 0.9, 10)  # n = 10
    assert quantile(s, 0.5) == pytest.approx(s[5])  # ceil(11 * 0.5) = 6th smallest
    assert quantile(s, 0.9) == pytest.approx(s[9])  # ceil(9.9) = 10th
    assert quantile(s, 0.95) == np.inf  # ceil(10.45) = 11 > n: every class
    assert prediction_sets(np.array([[0.9, 0.1]]), np.inf).all()


@pytest.mark.parametrize("bad", [0, 1, -0.5, 1.5, float("nan")])
def test_coverage_outside_0_1_is_refused(bad):
    with pytest.raises(UsageError, match="--coverage"):
        check_coverage(bad)


# ----------------------------------------------------------------------------- unknown


def _cluster(rng, n: int, centre: np.ndarray, spread: float = 0.3) -> np.ndarray:
    return np.abs(centre + rng.normal(0, spread, (n, len(centre))))


def test_ood_flags_far_away_features_and_about_5_percent_of_held_out_ones():
    rng = np.random.default_rng(4)
    centre = np.r_[np.ones(16), np.zeros(16)]
    far = np.r_[np.zeros(16), np.ones(16)]
    fit = fit_knn_ood(_cluster(rng, 400, centre), seed=0)
    assert fit.info["method"] == "knn-cosine" and fit.info["bank"] == 400
    assert np.mean(fit.oof_scores > fit.scorer.threshold) == pytest.approx(0.05, abs=0.01)
    held_out = fit.scorer.flags(fit.scorer.score(_cluster(rng, 2000, centre)))
    away = fit.scorer.flags(fit.scorer.score(_cluster(rng, 200, far)))
    assert away.all()
    assert 0.02 <= held_out.mean() <= 0.09
    assert fit.scorer.bank.dtype == np.float16


def test_ood_bank_is_capped_and_its_threshold_comes_from_the_images_left_out():
    rng = np.random.default_rng(5)
    X = _cluster(rng, 300, np.ones(8))
    fit = fit_knn_ood(X, seed=0, max_bank=100)
    assert fit.scorer.bank.shape == (100, 8)
    assert "left out of the bank" in fit.info["threshold_from"] and fit.info["of"] == 300
    assert fit_knn_ood(X[:9], seed=0) is None  # too few images for a threshold


# ----------------------------------------------------------------------------- multi-label


def test_label_sets_parse_and_make_a_matrix():
    assert parse_label_set(" wet; asphalt;;wet ") == ("asphalt", "wet")
    assert parse_label_set("") == () and parse_label_set(None) == ()
    Y, labels = label_matrix(["asphalt;wet", "", "gravel", None])
    assert labels == ["asphalt", "gravel", "wet"]
    assert Y.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(DataError, match="snow"):
        label_matrix(["snow"], ["asphalt", "wet"])


def test_multilabel_metrics_equal_scikit_learns():
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_recall_fscore_support,
    )

    rng = np.random.default_rng(6)
    Y = rng.random((200, 5)) < [0.1, 0.3, 0.5, 0.7, 0.05]
    Y[0] = True  # every label has a positive
    P = np.clip(Y * 0.3 + rng.random((200, 5)) * 0.7, 0, 1)
    P[:20, 1] = 0.5  # ties
    Z = P >= 0.5
    m = multilabel_metrics(Y, P, Z, list("abcde"))
    assert m["mAP"] == pytest.approx(average_precision_score(Y, P, average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(Y, Z, average="micro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(Y, Z, average="macro", zero_division=0))
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(Y, Z))
    p, r, f, s = precision_recall_fscore_support(Y, Z, zero_division=0)
    for j, lab in enumerate("abcde"):
        row = m["per_label"][lab]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[j], r[j], f[j]))
        assert row["support"] == s[j]
        assert row["ap"] == pytest.approx(average_precision_score(Y[:, j], P[:, j]))


def test_average_precision_without_positives_is_none_and_left_out_of_map():
    y = np.array([False, False])
    assert average_precision(y, np.array([0.2, 0.1])) is None
    m = multilabel_metrics(
        np.array([[1, 0], [0, 0]], bool), np.array([[0.9, 0.1], [0.2, 0.3]]),
        np.array([[1, 0], [0, 0]], bool), ["a", "b"],
    )  # fmt: skip
    assert m["mAP"] == 1.0 and m["per_label"]["b"]["ap"] is None


def test_f1_thresholds_separate_a_separable_label():
    P = np.array([[0.9], [0.8], [0.35], [0.3], [0.1]])
    Y = np.array([[1], [1], [1], [0], [0]], bool)
    t = best_f1_thresholds(P, Y)
    assert 0.3 < t[0] <= 0.35  # halfway between the last positive and the next one


def test_one_vs_rest_head_learns_each_label_and_keeps_out_of_fold_decisions():
    rng = np.random.default_rng(7)
    X = rng.normal(0, 1, (120, 6)).astype(np.float32)
    Y = np.stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0.5, X[:, 3] < -0.3], axis=1)
    head = MultiLabelLinear(kind="logreg", seed=0).fit(X, Y, ["a", "b", "c"])
    assert head.coef_.shape == (3, 6) and head.oof_decision_.shape == (120, 3)
    assert head.cv_results_ and head.C_ in [r.C for r in head.cv_results_]
    assert np.mean((head.decision_function(X) > 0) == Y) > 0.9
    post, notes = fit_multilabel(head.oof_decision_, Y, X, seed=0, fitted_on="oof")
    assert post.thresholds.shape == (3,) and post.platt_a.shape == (3,)
    with pytest.raises(DataError, match="every training image"):
        MultiLabelLinear().fit(X, np.c_[Y, np.ones(120, bool)], ["a", "b", "c", "d"])


# ----------------------------------------------------------------------------- saved parts


def _post(seed=0) -> PostHoc:
    rng = np.random.default_rng(seed)
    z, y = _draw(rng, 60)
    X = np.abs(rng.normal(0, 1, (60, 4)))
    post, notes = fit_multiclass(z, y, X, seed=0, fitted_on="test")
    assert notes == []
    return post


def test_posthoc_round_trips_through_its_config_and_tensors():
    post = _post()
    back = PostHoc.from_saved(
        post.to_config(), post.tensors(), task="multi-class", n_classes=3, dim=4, where="x"
    )
    assert back.temperature == post.temperature
    assert np.allclose(back.conformal_scores, post.conformal_scores)
    assert back.ood.threshold == post.ood.threshold
    assert np.array_equal(back.ood.bank, post.ood.bank)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c, t: c["probability"].update(temperature=-1.0), "temperature"),
        (lambda c, t: c["probability"].update(temperature=float("inf")), "temperature"),
        (lambda c, t: c["ood"].update(threshold="0.3"), "ood.threshold"),
        (lambda c, t: c["ood"].update(k=0), "ood.k"),
        (lambda c, t: c.update(version=99), "version"),
        (lambda c, t: c["conformal"].update(n=5), "conformal_scores"),
        (lambda c, t: t.update(ood_bank=t["ood_bank"][:, :2]), "ood_bank"),
        (lambda c, t: t.pop("conformal_scores"), "missing"),
        (lambda c, t: t.update(stray=np.zeros(2, np.float32)), "unexpected"),
        (lambda c, t: t.update(conformal_scores=t["conformal_scores"][::-1].copy()), "sorted"),
    ],
)
def test_a_damaged_calibration_is_refused_with_a_message(edit, message):
    post = _post()
    cfg, tensors = post.to_config(), post.tensors()
    edit(cfg, tensors)
    with pytest.raises(ArtifactError, match=message):
        PostHoc.from_saved(cfg, tensors, task="multi-class", n_classes=3, dim=4, where="x")
