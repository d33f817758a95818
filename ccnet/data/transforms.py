"""Augmentation and normalisation on NumPy arrays: random scale, mirror, pad + random crop, normalise.

Two training pipelines share these steps (`train_transform`); the schedule picks:
- ours (the default): resize by a factor of the image's own size, mirror, random crop, normalise the crop, pad;
- mmsegmentation 0.x's (`schedule.resize_bound`, `cat_max_ratio`, `photometric`; the zoo presets): keep-ratio
  resize to ratio x a [long, short] bound (mmcv's rule), mirror, a random crop in which no class covers
  cat_max_ratio or more of the labelled pixels (up to 10 tries), photometric distortion, normalise, pad.
  mmseg flips after cropping; a crop offset drawn uniformly makes the two orders the same distribution, and the
  photometric steps act on each pixel alone, so they commute with both. Each new step is off by default, and
  with all off the random draws and the output are those of ours, bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np


def draw_scale(rng, scale_range, scale_step=0.0) -> float:
    """A factor from [min, max]: uniform, or on a grid of scale_step when > 0 (the authors' 0.1 steps)."""
    low, high = scale_range
    if scale_step > 0:
        return rng.choice(np.arange(low, high + 1e-9, scale_step))
    return rng.uniform(low, high)


def rescale_size(h: int, w: int, bound) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size of the image's ratio within bound = (long, short) edges, each
    side rounded as int(side * factor + 0.5)."""
    factor = min(max(bound) / max(h, w), min(bound) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_pair(image, label, size_hw):
    """The image bilinear, the label nearest, to size_hw = (h, w); the label comes back int64."""
    size = (size_hw[1], size_hw[0])
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(
        label.astype(np.uint8) if label.max() < 256 else label.astype(np.float32),
        size,
        interpolation=cv2.INTER_NEAREST,
    ).astype(np.int64)
    return image, label


def random_scale(image, label, rng, scale_range, scale_step=0.0):
    """Resize by a factor of the image's own size drawn from scale_range (ours, the authors')."""
    scale = draw_scale(rng, scale_range, scale_step)
    h, w = label.shape
    return resize_pair(image, label, (max(1, int(round(h * scale))), max(1, int(round(w * scale)))))


def random_resize_to_bound(image, label, rng, bound, ratio_range, scale_step=0.0):
    """mmseg's Resize(img_scale=bound, ratio_range): a ratio r from ratio_range, the target scale
    (int(long * r), int(short * r)), then the keep-ratio rescale into it (`rescale_size`)."""
    ratio = draw_scale(rng, ratio_range, scale_step)
    h, w = label.shape
    target = (int(bound[0] * ratio), int(bound[1] * ratio))
    return resize_pair(image, label, rescale_size(h, w, target))


def random_mirror(image, label, rng):
    if rng.random() < 0.5:
        return image[:, ::-1], label[:, ::-1]
    return image, label


CROP_TRIES = 10  # mmseg's RandomCrop: crops checked against cat_max_ratio before the next one is taken as it is


def crop_offset(rng, shape, crop_size) -> tuple[int, int]:
    """Top-left corner of a random crop: y, then x, each uniform in [0, max(side - crop side, 0)]."""
    (h, w), (ch, cw) = shape, crop_size
    return rng.integers(0, max(h - ch, 0) + 1), rng.integers(0, max(w - cw, 0) + 1)


def crop_is_mixed(label, ignore_index, cat_max_ratio) -> bool:
    """mmseg's test of a crop: more than one class other than ignore_index, the largest under cat_max_ratio of
    the counted pixels."""
    counts = np.bincount(label.ravel())
    if 0 <= ignore_index < counts.size:
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio


def pad_and_random_crop(image, label, rng, crop_size, ignore_index=255, normalize_fn=None, cat_max_ratio=1.0):
    """Random crop_size window; where the image is smaller, pad the image with 0 and the label with ignore.

    The padding (bottom and right) means the mean colour once normalised, as in the authors' code; passing
    normalize_fn normalises only the cropped pixels (a 512 crop of a 2048-wide image: ~10x less work).
    cat_max_ratio < 1 (mmseg's RandomCrop): up to CROP_TRIES crops are checked (`crop_is_mixed`) and the first
    that passes is kept; when none does, one more is drawn and kept unchecked, as mmseg does.
    """
    ch, cw = crop_size
    y, x = crop_offset(rng, label.shape, crop_size)
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            if crop_is_mixed(label[y : y + ch, x : x + cw], ignore_index, cat_max_ratio):
                break
            y, x = crop_offset(rng, label.shape, crop_size)
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


def to_uint8(values, alpha=1.0, beta=0.0):
    """values * alpha + beta in float32, clipped to [0, 255] and cast to uint8 (truncated), as mmseg's convert."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """mmseg 0.x's PhotoMetricDistortion on an RGB uint8 image; returns RGB uint8.

    In order, each step applied when a coin (rng.integers(2)) says so: brightness + delta (uniform +-brightness);
    then a coin picks where contrast goes, 1: here, 0: last; contrast x alpha (uniform in the range); saturation
    x alpha (uniform) in HSV; hue + delta (an integer in [-hue, hue), as NumPy's randint) mod 180 in HSV; the
    contrast if it was left for last. Every step ends in uint8 (clipped to [0, 255], truncated). HSV is OpenCV's
    8-bit convention (H in [0, 180), S and V in [0, 255]); mmseg converts its BGR image with COLOR_BGR2HSV, we
    convert our RGB one with COLOR_RGB2HSV: the same H, S, V for the same colour.
    """

    def apply_contrast(img):
        return to_uint8(img, alpha=rng.uniform(*contrast)) if rng.integers(2) else img

    img = to_uint8(image, beta=rng.uniform(-brightness, brightness)) if rng.integers(2) else image
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        img = apply_contrast(img)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = to_uint8(hsv[:, :, 1], alpha=rng.uniform(*saturation))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + rng.integers(-hue, hue)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        img = apply_contrast(img)
    return img


def train_transform(image, label, rng, cfg_dataset, cfg_schedule):
    """The training pipeline: scale, mirror, crop (+ pad), normalise; returns (C x H x W float32, H x W int64).

    schedule.resize_bound / cat_max_ratio / photometric switch on mmseg's steps (see the module's docstring)."""
    s = cfg_schedule
    if s.resize_bound:
        image, label = random_resize_to_bound(image, label, rng, s.resize_bound, s.scale_range, s.scale_step)
    else:
        image, label = random_scale(image, label, rng, s.scale_range, s.scale_step)
    if s.mirror:
        image, label = random_mirror(image, label, rng)

    def finish(crop):
        if s.photometric:
            crop = photometric_distortion(np.ascontiguousarray(crop), rng)
        return normalize(crop, cfg_dataset.mean, cfg_dataset.std, cfg_dataset.bgr)

    image, label = pad_and_random_crop(
        image, label, rng, s.crop_size, cfg_dataset.ignore_index, finish, s.cat_max_ratio
    )
    return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label)


def eval_transform(image, cfg_dataset):
    """Normalise only: C x H x W float32."""
    image = normalize(image, cfg_dataset.mean, cfg_dataset.std, cfg_dataset.bgr)
    return np.ascontiguousarray(image.transpose(2, 0, 1))
