"""Confusion matrix and IoU against a case computed by hand."""

import numpy as np

from ccnet.engine.metrics import confusion_matrix, segmentation_metrics


def test_hand_computed_case():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = confusion_matrix(pred, label, 4, 255)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 3, gt 3, pred 4 -> 3/4; class 2: tp 1, gt 2, pred 1 -> 1/2
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    assert m["per_class_iou"] == {"a": 1 / 3, "b": 3 / 4, "c": 1 / 2, "d": None}
    assert m["absent_classes"] == ["d"]
    assert abs(m["mIoU"] - (1 / 3 + 3 / 4 + 1 / 2) / 3) < 1e-12
    assert abs(m["pixel_accuracy"] - 5 / 7) < 1e-12
    assert abs(m["mean_accuracy"] - (1 / 2 + 1 + 1 / 2) / 3) < 1e-12
    assert m["pixels"] == 7


def test_summed_confusion_is_exact_past_float32_precision():
    n = 20_000_000  # beyond 2**24: a float32 running sum would stop counting
    label = np.zeros(n, np.uint8)
    pred = np.zeros(n, np.uint8)
    pred[:3] = 1
    conf = confusion_matrix(pred, label, 2)
    assert conf[0, 0] == n - 3 and conf[0, 1] == 3 and conf.dtype == np.int64
