"""Classification metrics from exact predictions: accuracy, loss, per-class P/R/F1, confusion.

flax ships running averages only; per-class metrics need the full confusion matrix, which is
cheap to build on the host once evaluation has produced every prediction exactly once.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of images of true class ``i`` predicted as ``j``."""
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (np.asarray(labels), np.asarray(preds)), 1)
    return c


def per_class_scores(confusion: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class (0 where undefined, never NaN)."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    out = {}
    for i, name in enumerate(classes):
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[name] = {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f1),
            "support": int(support[i]),
        }
    return out


def summarise(
    labels: np.ndarray, probs: np.ndarray, losses: np.ndarray, classes: list[str]
) -> dict:
    """The eval result: accuracy, mean loss, counts, per-class scores and confusion."""
    preds = np.argmax(probs, axis=-1)
    conf = confusion_matrix(labels, preds, len(classes))
    n = len(labels)
    return {
        "accuracy": float(np.mean(preds == labels)) if n else 0.0,
        "loss": float(np.mean(losses)) if n else 0.0,
        "num_images": int(n),
        "classes": list(classes),
        "per_class": per_class_scores(conf, list(classes)),
        "confusion": conf.tolist(),
    }
