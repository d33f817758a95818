"""Evaluate a model on a data set: summed confusion matrix, metrics, a few colourised predictions."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ccnet.data.datasets import DataError
from ccnet.data.loader import eval_samples

from .inference import predict_prepared, prepare_views
from .metrics import confusion_matrix, format_table, segmentation_metrics

log = logging.getLogger(__name__)


def side_by_side(dataset, image_chw_rgb: np.ndarray, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB uint8 picture: input | ground truth | prediction (class colours, ignore in white)."""
    return np.concatenate([image_chw_rgb, dataset.color(label), dataset.color(pred)], axis=1)


def evaluate(
    model, dataset, cfg_dataset, cfg_eval, vis_dir: Path | None = None, desc="eval", submission_dir: Path | None = None
):
    """Returns (metrics dict, list of side-by-side RGB pictures of the first cfg_eval.num_vis images).

    With submission_dir, every prediction is also saved there in the benchmark's format (Cityscapes: label-id
    PNGs named after the image); a data set without one is an error.
    """
    write_submission = dataset.meta.get("write_submission") if submission_dir is not None else None
    if submission_dir is not None and write_submission is None:
        raise DataError(f"eval.save_submission: the {dataset.name} data set has no submission format (Cityscapes has)")
    was_training = model.is_training()
    model.eval()
    n = len(dataset) if cfg_eval.max_images <= 0 else min(cfg_eval.max_images, len(dataset))
    conf = np.zeros((dataset.num_classes, dataset.num_classes), np.int64)
    pictures, start = [], time.time()
    subset = _Head(dataset, n)
    bar = tqdm(  # the loader's threads decode, resize and normalise (prepare_views); the model runs here
        eval_samples(subset, lambda im: prepare_views(im, cfg_dataset, cfg_eval), cfg_dataset.num_workers),
        total=n,
        desc=desc,
        dynamic_ncols=True,
        leave=False,
    )
    for index, prepared, label in bar:
        pred = predict_prepared(model, prepared, cfg_eval).argmax(0)
        conf += confusion_matrix(pred, label, dataset.num_classes, dataset.ignore_index)
        if write_submission is not None:
            write_submission(pred, dataset.pairs[index][0], submission_dir)
        if len(pictures) < cfg_eval.num_vis:
            pictures.append(side_by_side(dataset, dataset.read(index)[0], label, pred))
        bar.set_postfix(img_s=f"{(bar.n + 1) / (time.time() - start):.1f}")
    exclude, absent = cfg_eval.get("miou_exclude") or [], cfg_eval.get("absent_iou", "skip")
    metrics = segmentation_metrics(conf, dataset.class_names, list(exclude), absent)
    metrics["images"] = n
    metrics["eval_seconds"] = round(time.time() - start, 2)
    if vis_dir is not None:
        vis_dir.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            cv2.imwrite(str(vis_dir / f"{i:03d}.png"), picture[:, :, ::-1])
    log.info("%s on %d images:\n%s", desc, n, format_table(metrics))
    if was_training:
        model.train()
    return metrics, pictures


class _Head:
    """The first n samples of a data set."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __len__(self):
        return self.n

    def read(self, index):
        return self.dataset.read(index)
