"""tlearn.evaluate computes scikit-learn's metrics in numpy (importing sklearn.metrics
costs more than a warm evaluate): the numbers must be scikit-learn's, to the bit."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from tlearn.report.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n = int(rng.integers(1, 60))
    y_true = rng.integers(0, k, n)
    # mostly right, some wrong, and sometimes a class never predicted or never present
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, k, n))
    if seed % 2:
        y_pred[y_pred == k - 1] = 0
    if seed % 3 == 0:
        y_true[y_true == 1] = 0
    classes = [f"c{i}" for i in range(k)]
    m = classification_metrics(y_true, y_pred, classes)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert m["accuracy"] == float(accuracy_score(y_true, y_pred))
    if len(np.unique(y_true)) > 1:
        assert m["balanced_accuracy"] == float(balanced_accuracy_score(y_true, y_pred))
    else:
        assert m["balanced_accuracy"] == m["accuracy"]
    for i, c in enumerate(classes):
        got = m["per_class"][c]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == (
            float(p[i]),
            float(r[i]),
            float(f[i]),
            int(s[i]),
        )
    assert m["confusion"]["matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
