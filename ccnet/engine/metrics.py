"""Confusion matrix and IoU in int64 / float64 NumPy (Jittor's float32 sums drift on millions of pixels).

Convention (the standard): a class absent from both the ground truth and the predictions of the whole set has IoU
NaN and is left out of the mean (as the Cityscapes scripts and mmsegmentation do); `absent_classes` lists them.
Another convention is a metric setting (`eval.miou_exclude`, `eval.absent_iou`): the seed's evaluate.py
(Trugen/ANN-Lab) leaves class 0 out of the mean and counts an absent class as 0. Then `mIoU` is that convention's
and `mIoU_standard` the standard one beside it.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes x num_classes) int64, rows = ground truth, columns = prediction; ignore pixels dropped."""
    valid = label != ignore_index
    gt = label[valid].astype(np.int64)
    pr = pred[valid].astype(np.int64)
    return np.bincount(gt * num_classes + pr, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(iou: np.ndarray, exclude=(), absent: str = "skip") -> float:
    """The mean of per-class IoUs (NaN: absent) without the classes in `exclude`; absent: skip | zero."""
    keep = np.ones(len(iou), bool)
    keep[list(exclude)] = False
    chosen = iou[keep]
    if absent == "zero":
        chosen = np.nan_to_num(chosen, nan=0.0)
    return float(np.nanmean(chosen)) if np.isfinite(chosen).any() else 0.0


def segmentation_metrics(conf: np.ndarray, class_names=None, miou_exclude=(), absent_iou: str = "skip") -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy from a summed confusion matrix; mIoU by the
    convention asked for (and then mIoU_standard beside it where that is not the standard)."""
    conf = conf.astype(np.int64)
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(1).astype(np.float64)
    pred = conf.sum(0).astype(np.float64)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    standard = {} if (not len(miou_exclude) and absent_iou == "skip") else {"mIoU_standard": mean_iou(iou)}
    convention = {} if not standard else {"miou_convention": miou_convention(miou_exclude, absent_iou, names)}
    return {
        "mIoU": mean_iou(iou, miou_exclude, absent_iou),
        **standard,
        **convention,
        "pixel_accuracy": float(tp.sum() / max(gt.sum(), 1.0)),
        "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "absent_classes": [n for n, u in zip(names, union) if u == 0],
        "pixels": int(gt.sum()),
    }


def miou_convention(exclude, absent: str, names) -> str:
    left_out = ", ".join(f"{c} ({names[c]})" for c in exclude)
    parts = ([f"classes {left_out} left out of the mean"] if left_out else []) + (
        ["absent classes counted as 0"] if absent == "zero" else []
    )
    return "; ".join(parts)


def format_table(metrics: dict) -> str:
    """A plain-text per-class table plus the summary lines."""
    rows = [f"{'class':<24}{'IoU %':>8}"]
    for name, iou in metrics["per_class_iou"].items():
        rows.append(f"{name:<24}{'absent' if iou is None else f'{100 * iou:.2f}':>8}")
    rows.append(f"{'mIoU':<24}{100 * metrics['mIoU']:>8.2f}")
    if "mIoU_standard" in metrics:  # mIoU is another convention's: say which, and give the standard one beside it
        rows[-1] += f"  ({metrics['miou_convention']})"
        rows.append(f"{'mIoU (standard)':<24}{100 * metrics['mIoU_standard']:>8.2f}")
    rows.append(f"{'pixel accuracy':<24}{100 * metrics['pixel_accuracy']:>8.2f}")
    rows.append(f"{'mean accuracy':<24}{100 * metrics['mean_accuracy']:>8.2f}")
    return "\n".join(rows)
