"""Augmentation and normalisation on NumPy arrays: random scale, mirror, pad + random crop, normalise."""

from __future__ import annotations

import cv2
import numpy as np


def random_scale(image, label, rng, scale_range, scale_step=0.0):
    """Resize by a factor drawn from [min, max] (on a grid of scale_step when > 0, as the authors' 0.1 steps)."""
    low, high = scale_range
    if scale_step > 0:
        scale = rng.choice(np.arange(low, high + 1e-9, scale_step))
    else:
        scale = rng.uniform(low, high)
    h, w = label.shape
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(
        label.astype(np.uint8) if label.max() < 256 else label.astype(np.float32),
        size,
        interpolation=cv2.INTER_NEAREST,
    ).astype(np.int64)
    return image, label


def random_mirror(image, label, rng):
    if rng.random() < 0.5:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def pad_and_random_crop(image, label, rng, crop_size, ignore_index=255, normalize_fn=None):
    """Random crop_size window; where the image is smaller, pad the image with 0 and the label with ignore.

    The padding (bottom and right) means the mean colour once normalised, as in the authors' code; passing
    normalize_fn normalises only the cropped pixels (a 512 crop of a 2048-wide image: ~10x less work).
    """
    ch, cw = crop_size
    h, w = label.shape
    y, x = rng.integers(0, max(h - ch, 0) + 1), rng.integers(0, max(w - cw, 0) + 1)
    image, label = image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]
    if normalize_fn is not None:
        image = normalize_fn(image)
    ph, pw = ch - label.shape[0], cw - label.shape[1]
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return image, label


def normalize(image, mean, std, bgr=False):
    """RGB uint8 H x W x 3 -> float32 H x W x 3, channel order BGR when bgr (the MIT ResNet weights)."""
    image = image.astype(np.float32)
    if bgr:
        image = image[:, :, ::-1]
    return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def train_transform(image, label, rng, cfg_dataset, cfg_schedule):
    """The training pipeline: scale, mirror, crop (+ pad), normalise; returns (C x H x W float32, H x W int64)."""
    image, label = random_scale(image, label, rng, cfg_schedule.scale_range, cfg_schedule.scale_step)
    if cfg_schedule.mirror:
        image, label = random_mirror(image, label, rng)
    image, label = pad_and_random_crop(
        image,
        label,
        rng,
        cfg_schedule.crop_size,
        cfg_dataset.ignore_index,
        lambda crop: normalize(crop, cfg_dataset.mean, cfg_dataset.std, cfg_dataset.bgr),
    )
    return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label)


def eval_transform(image, cfg_dataset):
    """Normalise only: C x H x W float32."""
    image = normalize(image, cfg_dataset.mean, cfg_dataset.std, cfg_dataset.bgr)
    return np.ascontiguousarray(image.transpose(2, 0, 1))
