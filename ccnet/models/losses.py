"""Pixel-wise losses: cross-entropy with an ignore label, and online hard example mining (OHEM)."""

from __future__ import annotations

import functools
import math

import jittor as jt
import numpy as np
from jittor import nn

from ccnet.registry import LOSSES


def true_class_log_prob(logits: jt.Var, target: jt.Var, ignore_index: int):
    """log p(true class) per pixel (B, H, W) and the mask of pixels that count."""
    valid = target != ignore_index
    safe_target = jt.where(valid, target, jt.zeros_like(target))
    log_prob = nn.log_softmax(logits, dim=1)
    picked = log_prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return picked, valid


def valid_count(mask: jt.Var) -> jt.Var:
    """Pixels that count; under MPI the mean over ranks, so that the averaged gradients of N ranks equal
    those of one process with the combined batch (each rank's own count would weight ranks unequally)."""
    count = mask.sum()
    if jt.in_mpi:
        count = count.mpi_all_reduce("mean")
    return count.maximum(1.0).stop_grad()


CE_AVERAGES = ("valid", "all")  # model.ce_average


def cross_entropy(logits: jt.Var, target: jt.Var, ignore_index: int = 255, average: str = "valid") -> jt.Var:
    """Mean CE over the pixels whose label is not ignore_index; logits (B, C, H, W), target (B, H, W).

    average="all": the sum over those pixels divided by every pixel of the batch, ignored (and padded) ones
    included, as mmsegmentation 0.x's CrossEntropyLoss (avg_non_ignore=False); under MPI each rank divides by its
    own pixel count, the same on every rank, and the averaged gradients are those of the combined batch."""
    if average not in CE_AVERAGES:
        raise ValueError(f"average={average!r}: expected one of {', '.join(CE_AVERAGES)}")
    picked, valid = true_class_log_prob(logits, target, ignore_index)
    valid = valid.float32()
    if average == "all":
        return -(picked * valid).sum() / float(max(1, math.prod(target.shape)))
    return -(picked * valid).sum() / valid_count(valid)


def ohem_cross_entropy(logits, target, ignore_index=255, thresh=0.7, min_kept=100000) -> jt.Var:
    """CE over the hard pixels: true-class prob <= max(thresh, k-th smallest prob), k = min_kept (authors')."""
    picked, valid = true_class_log_prob(logits, target, ignore_index)
    prob = np.exp(picked.numpy())[valid.numpy()]
    threshold = thresh
    if 0 < min_kept < prob.size:
        kth = np.partition(prob, min_kept - 1)[min_kept - 1]
        threshold = max(thresh, float(kth))
    keep = (valid & (picked.exp() <= threshold)).float32()
    return -(picked * keep).sum() / valid_count(keep)


# A loss registers a factory returning loss(logits, target, ignore_index); its settings are the config keys
# model.<name>_<setting> (model.ohem_thresh -> thresh), picked out by `loss_settings`.


@LOSSES.register("ce")
def ce_loss(average: str = "valid"):
    return functools.partial(cross_entropy, average=average)


@LOSSES.register("ohem")
def ohem_loss(thresh: float = 0.7, min_kept: int = 100000):
    return functools.partial(ohem_cross_entropy, thresh=thresh, min_kept=min_kept)


def loss_settings(name: str, cfg_model) -> dict:
    """{setting: value} of the model.<name>_<setting> keys (the settings of loss `name`)."""
    prefix = f"{name}_"
    return {key[len(prefix) :]: value for key, value in cfg_model.items() if key.startswith(prefix)}
