"""Task metrics on fixed predictions against values worked out by hand and against scipy."""

import numpy as np
import pytest
from scipy import stats

from scaletrain.evaluation.metrics import (accuracy, average_ranks, classification_metrics, macro_f1, matthews,
                                           pearson, prediction_metrics, spearman)

# 3 classes, 8 samples. Confusion (rows true, columns predicted):
#   [[2, 1, 0],      class 0: tp 2, support 3, predicted 3 -> F1 2*2/(3+3) = 2/3
#    [0, 2, 1],      class 1: tp 2, support 3, predicted 3 -> 2/3
#    [1, 0, 1]]      class 2: tp 1, support 2, predicted 2 -> 1/2
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PREDICTED = np.array([0, 0, 1, 1, 1, 2, 2, 0])


def test_classification_metrics_by_hand():
    assert accuracy(PREDICTED, LABELS) == 5 / 8
    assert macro_f1(PREDICTED, LABELS, 3) == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    # c = 5, s = 8, t = p = (3, 3, 2): (5*8 - 22) / sqrt((64 - 22)(64 - 22)) = 18 / 42
    assert matthews(PREDICTED, LABELS, 3) == pytest.approx(18 / 42)
    logits = np.eye(3)[PREDICTED]
    assert classification_metrics(logits, LABELS) == pytest.approx(
        {"val_accuracy": 5 / 8, "val_f1": 11 / 18, "val_mcc": 3 / 7})


def test_a_prediction_of_no_class_counts_wrong_as_a_class_of_its_own():
    # text-to-text: sample 6 (true class 2) spelled no label (3). Confusion rows true, columns predicted 0..3:
    #   [[2, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    # F1: 2/3, 2/3, 0 (tp 0), 0 (the "none" column: predicted once, never true); macro over the 4 present
    # MCC: c 4, s 8, t (3, 3, 2, 0), p (3, 3, 1, 1): (32 - 20) / sqrt((64 - 20)(64 - 22))
    predicted = np.array([0, 0, 1, 1, 1, 2, 3, 0])
    assert prediction_metrics(predicted, LABELS, 3) == pytest.approx(
        {"val_accuracy": 4 / 8, "val_f1": (2 / 3 + 2 / 3) / 4, "val_mcc": 12 / np.sqrt(44 * 42)})
    assert prediction_metrics(PREDICTED, LABELS, 3) == classification_metrics(np.eye(3)[PREDICTED], LABELS)


def test_binary_matthews_is_the_phi_coefficient_and_degenerate_cases_are_defined():
    labels, predicted = np.array([1, 1, 1, 0, 0, 0, 0, 1]), np.array([1, 1, 0, 0, 0, 1, 0, 1])
    tp, tn, fp, fn = 3, 3, 1, 1
    phi = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(predicted, labels, 2) == pytest.approx(phi)
    assert matthews(np.zeros(4, int), np.array([0, 1, 0, 1]), 2) == 0.0  # one class predicted: undefined -> 0
    # a class absent from both labels and predictions does not enter the macro average
    assert macro_f1(np.array([0, 1]), np.array([0, 1]), 5) == 1.0


def test_regression_metrics_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = np.round(x + rng.normal(scale=0.5, size=50), 1)  # rounding makes ties
    y[:5] = y[0]
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert np.isnan(pearson(np.ones(4), np.arange(4.0)))  # a constant prediction has no correlation
