"""Task metrics on fixed predictions (numpy, no torch): the trainer's in-loop validation and evaluation share
them. Classification: accuracy, macro F1, Matthews correlation; regression: Pearson and Spearman."""

from __future__ import annotations

import numpy as np


def confusion(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows the true class, columns the predicted one."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted == labels).mean())


def macro_f1(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """The unweighted mean F1 over the classes that occur in the labels or the predictions (scikit-learn's
    default); a class never predicted correctly scores 0."""
    matrix = confusion(predicted, labels, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    support, predicted_count = matrix.sum(axis=1), matrix.sum(axis=0)
    present = (support + predicted_count) > 0
    f1 = 2 * true_positive / np.maximum(support + predicted_count, 1)  # = 2PR / (P + R)
    return float(f1[present].mean())


def matthews(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """The multiclass Matthews correlation (Gorodkin 2004): (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c
    correct predictions, s samples, t and p the true and predicted class counts; 0 when undefined."""
    matrix = confusion(predicted, labels, num_classes).astype(np.float64)
    t, p = matrix.sum(axis=1), matrix.sum(axis=0)
    c, s = np.trace(matrix), matrix.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """NaN when either side is constant (no correlation is defined)."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """logits (N, K), labels (N,) class ids -> val_accuracy, val_f1 (macro), val_mcc."""
    return prediction_metrics(logits.argmax(axis=1), labels, logits.shape[1])


def prediction_metrics(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Predicted class ids (N,), where num_classes means none of them (a text-to-text output that spells no
    label: one more class of the confusion matrix, as scikit-learn counts a label only predictions hold)."""
    classes = num_classes + int((predicted == num_classes).any())
    return {"val_accuracy": accuracy(predicted, labels), "val_f1": macro_f1(predicted, labels, classes),
            "val_mcc": matthews(predicted, labels, classes)}


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """predictions (N,) or (N, 1), labels (N,) -> val_pearson, val_spearman."""
    predictions = predictions.reshape(-1)
    return {"val_pearson": pearson(predictions, labels), "val_spearman": spearman(predictions, labels)}


def task_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return classification_metrics(outputs, labels) if task == "classification" else regression_metrics(outputs, labels)
