"""Confusion matrix and IoU in int64 / float64 NumPy (Jittor's float32 sums drift on millions of pixels).

Convention: a class absent from both the ground truth and the predictions of the whole set has IoU NaN and is
left out of the mean (as the Cityscapes scripts and mmsegmentation do); `absent_classes` lists them.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes x num_classes) int64, rows = ground truth, columns = prediction; ignore pixels dropped."""
    valid = label != ignore_index
    gt = label[valid].astype(np.int64)
    pr = pred[valid].astype(np.int64)
    return np.bincount(gt * num_classes + pr, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray, class_names=None) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy from a summed confusion matrix."""
    conf = conf.astype(np.int64)
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(1).astype(np.float64)
    pred = conf.sum(0).astype(np.float64)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / max(gt.sum(), 1.0)),
        "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "absent_classes": [n for n, u in zip(names, union) if u == 0],
        "pixels": int(gt.sum()),
    }


def format_table(metrics: dict) -> str:
    """A plain-text per-class table plus the summary lines."""
    rows = [f"{'class':<24}{'IoU %':>8}"]
    for name, iou in metrics["per_class_iou"].items():
        rows.append(f"{name:<24}{'absent' if iou is None else f'{100 * iou:.2f}':>8}")
    rows.append(f"{'mIoU':<24}{100 * metrics['mIoU']:>8.2f}")
    rows.append(f"{'pixel accuracy':<24}{100 * metrics['pixel_accuracy']:>8.2f}")
    rows.append(f"{'mean accuracy':<24}{100 * metrics['mean_accuracy']:>8.2f}")
    return "\n".join(rows)
