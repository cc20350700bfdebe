"""Exact metrics from predictions: balanced accuracy and macro-F1 beside plain accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from springfield.training.metrics import summarise


def _one_hot(preds: list[int], num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[preds]


def test_a_model_that_ignores_the_small_class_scores_low_on_balanced_metrics():
    # 8 images of class 0 and 2 of class 1, all predicted 0: 80% accurate, yet blind to 1.
    labels = np.array([0] * 8 + [1] * 2)
    result = summarise(labels, _one_hot([0] * 10, 2), np.zeros(10), ["big", "small"])
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["balanced_accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    f1_big = 2 * 0.8 * 1.0 / (0.8 + 1.0)  # precision 8/10, recall 8/8
    assert result["macro_f1"] == pytest.approx((f1_big + 0.0) / 2)
    # Getting the small class right moves the balanced metrics far more than accuracy.
    fixed = summarise(labels, _one_hot([0] * 8 + [1, 1], 2), np.zeros(10), ["big", "small"])
    assert fixed["accuracy"] - result["accuracy"] == pytest.approx(0.2)
    assert fixed["balanced_accuracy"] - result["balanced_accuracy"] == pytest.approx(0.5)
    assert fixed["macro_f1"] == pytest.approx(1.0)


def test_classes_absent_from_the_labels_are_left_out_of_per_class_and_macro_scores():
    # A test folder with classes 0 and 2 of three; one image of 2 is mistaken for 1.
    labels = np.array([0, 0, 2, 2])
    result = summarise(labels, _one_hot([0, 0, 2, 1], 3), np.zeros(4), ["a", "b", "c"])
    assert set(result["per_class"]) == {"a", "c"}
    assert result["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    f1_c = 2 * 1.0 * 0.5 / 1.5
    assert result["macro_f1"] == pytest.approx((1.0 + f1_c) / 2)
    # The confusion matrix keeps every class of the model: the mistake shows as column b.
    assert result["confusion"] == [[2, 0, 0], [0, 0, 0], [0, 1, 1]]
