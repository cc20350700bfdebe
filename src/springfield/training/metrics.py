"""Classification metrics from exact predictions: accuracy, balanced accuracy, macro-F1, loss,
per-class P/R/F1, confusion.

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


def balanced_scores(confusion: np.ndarray) -> tuple[float, float]:
    """``(balanced accuracy, macro-F1)`` over the classes present in the labels.

    Balanced accuracy is the mean recall; macro-F1 the mean F1. Both weigh a class of 26
    images as much as one of 90, so a model that ignores a small class scores low even
    where plain accuracy hides it. Classes without a true image (an evaluation folder that
    holds only some of the model's classes) are left out, as scikit-learn does when given
    the labels present.
    """
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = support > 0
    if not present.any():
        return 0.0, 0.0
    recall = tp[present] / support[present]
    precision = np.divide(
        tp[present],
        predicted[present],
        out=np.zeros(int(present.sum())),
        where=predicted[present] > 0,
    )
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(recall.mean()), float(f1.mean())


def summarise(
    labels: np.ndarray, probs: np.ndarray, losses: np.ndarray, classes: list[str]
) -> dict:
    """The eval result: accuracy, balanced accuracy, macro-F1, mean loss, counts, per-class
    scores (of the classes present in ``labels``) and the full confusion matrix."""
    preds = np.argmax(probs, axis=-1)
    conf = confusion_matrix(labels, preds, len(classes))
    n = len(labels)
    balanced, macro_f1 = balanced_scores(conf)
    scores = per_class_scores(conf, list(classes))
    return {
        "accuracy": float(np.mean(preds == labels)) if n else 0.0,
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "loss": float(np.mean(losses)) if n else 0.0,
        "num_images": int(n),
        "classes": list(classes),
        "per_class": {c: s for c, s in scores.items() if s["support"] > 0},
        "confusion": conf.tolist(),
    }
