"""Central evaluation's macro-F1: hand-checked, and equal to sklearn's definition."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fedsim.learning.evaluation import macro_f1


def test_macro_f1_by_hand() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    # class 0: TP 1, FP 1, FN 1 -> 2/(2+1+1) = 0.5; class 1: TP 2, FP 1, FN 0 -> 4/5 = 0.8;
    # class 2: TP 0, FN 1 -> 0.  Mean = (0.5 + 0.8 + 0) / 3 = 0.4333...
    assert macro_f1(y_true, y_pred) == pytest.approx(1.3 / 3)


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions() -> None:
    # labels 0 and 5 only: classes 1-4 never occur and must not dilute the mean
    assert macro_f1(np.array([0, 5]), np.array([0, 5])) == 1.0


@pytest.mark.parametrize("seed", range(20))
def test_macro_f1_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 6, 50), rng.integers(0, 8, 50)
    expected = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
