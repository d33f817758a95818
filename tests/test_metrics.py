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


def test_the_seeds_miou_convention_by_hand():
    """eval.miou_exclude=[0] eval.absent_iou=zero (Trugen/ANN-Lab evaluate.py: IU[1:], tp / max(1, union)) on a
    4-class matrix where class 3 is absent; the standard mIoU stays beside it."""
    conf = np.array(
        [
            [5, 1, 0, 0],  # gt 0: tp 5, gt 6, pred 5 + 0 + 2 = 7 -> 5 / 8
            [0, 3, 1, 0],  # gt 1: tp 3, gt 4, pred 1 + 3 + 0 = 4 -> 3 / 5
            [2, 0, 2, 0],  # gt 2: tp 2, gt 4, pred 0 + 1 + 2 = 3 -> 2 / 5
            [0, 0, 0, 0],  # class 3: absent from labels and predictions
        ]
    )
    names = ["road", "b", "c", "d"]
    seed = segmentation_metrics(conf, names, miou_exclude=[0], absent_iou="zero")
    assert abs(seed["mIoU"] - (3 / 5 + 2 / 5 + 0) / 3) < 1e-12  # 1/3: classes 1, 2 and the absent 3 as 0
    assert abs(seed["mIoU_standard"] - (5 / 8 + 3 / 5 + 2 / 5) / 3) < 1e-12  # 13/24: absent skipped, 0 kept
    assert seed["miou_convention"] == "classes 0 (road) left out of the mean; absent classes counted as 0"
    only_skip = segmentation_metrics(conf, names, miou_exclude=[0])
    assert abs(only_skip["mIoU"] - (3 / 5 + 2 / 5) / 2) < 1e-12
    only_zero = segmentation_metrics(conf, names, absent_iou="zero")
    assert abs(only_zero["mIoU"] - (5 / 8 + 3 / 5 + 2 / 5 + 0) / 4) < 1e-12
    standard = segmentation_metrics(conf, names)
    assert "mIoU_standard" not in standard and abs(standard["mIoU"] - seed["mIoU_standard"]) < 1e-12


def test_the_seeds_formula_written_out_agrees():
    """The same numbers from the seed's own formula, transcribed: (tp / maximum(1, pos + res - tp))[1:].mean()."""
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 50, (6, 6))
    conf[4, :] = 0
    conf[:, 4] = 0  # one absent class
    pos, res, tp = conf.sum(1), conf.sum(0), np.diag(conf)
    theirs = (tp / np.maximum(1.0, pos + res - tp))[1:].mean()
    ours = segmentation_metrics(conf, None, miou_exclude=[0], absent_iou="zero")["mIoU"]
    assert abs(ours - theirs) < 1e-12


def test_summed_confusion_is_exact_past_float32_precision():
    n = 20_000_000  # beyond 2**24: a float32 running sum would stop counting
    label = np.zeros(n, np.uint8)
    pred = np.zeros(n, np.uint8)
    pred[:3] = 1
    conf = confusion_matrix(pred, label, 2)
    assert conf[0, 0] == n - 3 and conf[0, 1] == 3 and conf.dtype == np.int64
