"""Inference on one normalised image: whole, sliding window, multi-scale with flip. Logits are averaged.

All functions take a C x H x W float32 NumPy image and return logits (classes x H x W, NumPy float32)
at the image's size; `model` is any callable mapping a (1, 3, h, w) jittor Var to (1, classes, h, w) logits.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ccnet import runtime

jt = runtime.ensure_setup()  # Jittor, set up first (a no-op after run.py's own set-up)


def predict_whole(model, image: np.ndarray) -> np.ndarray:
    with jt.no_grad():
        return model(jt.array(image[None])).numpy()[0]


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window origins covering [0, size): a regular grid, the last window flush with the border."""
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(count)})


def predict_sliding(model, image: np.ndarray, tile, stride) -> np.ndarray:
    """Windows of `tile` every `stride`; images smaller than a tile are padded (with 0: the mean colour)."""
    c, h, w = image.shape
    th, tw = tile
    ph, pw = max(th - h, 0), max(tw - w, 0)
    padded = np.pad(image, ((0, 0), (0, ph), (0, pw))) if (ph or pw) else image
    hh, ww = padded.shape[1:]
    scores, counts = None, np.zeros((hh, ww), np.float32)
    for y in tile_starts(hh, th, stride[0]):
        for x in tile_starts(ww, tw, stride[1]):
            window = padded[:, y : y + min(th, hh), x : x + min(tw, ww)]
            logits = predict_whole(model, np.ascontiguousarray(window))
            if scores is None:
                scores = np.zeros((logits.shape[0], hh, ww), np.float32)
            scores[:, y : y + window.shape[1], x : x + window.shape[2]] += logits
            counts[y : y + window.shape[1], x : x + window.shape[2]] += 1
    return (scores / counts)[:, :h, :w]


def resize_chw(array: np.ndarray, size_hw) -> np.ndarray:
    """Bilinear resize of C x H x W (half-pixel centres, as align_corners=False); OpenCV takes <= 512 channels."""
    parts = []
    for start in range(0, array.shape[0], 512):
        hwc = np.ascontiguousarray(array[start : start + 512].transpose(1, 2, 0))
        out = cv2.resize(hwc, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
        parts.append(out.reshape(size_hw[0], size_hw[1], -1).transpose(2, 0, 1))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def predict(
    model, image: np.ndarray, mode="whole", tile=(769, 769), stride=(513, 513), scales=(1.0,), flip=False
) -> np.ndarray:
    """Logits averaged over windows, scales (and horizontal flips), at the image's size."""
    h, w = image.shape[1:]
    total = None
    for scale in scales:
        size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
        scaled = image if size == (h, w) else np.ascontiguousarray(resize_chw(image, size))
        variants = [(scaled, False)] + ([(np.ascontiguousarray(scaled[:, :, ::-1]), True)] if flip else [])
        for variant, flipped in variants:
            if mode == "whole":
                logits = predict_whole(model, variant)
            elif mode == "slide":
                if tile is None or stride is None:
                    raise ValueError("eval.mode=slide needs eval.crop_size and eval.stride (e.g. eval=slide_769)")
                logits = predict_sliding(model, variant, tile, stride)
            else:
                raise ValueError(f"eval.mode={mode!r}: expected whole or slide")
            if flipped:
                logits = logits[:, :, ::-1]
            logits = logits if size == (h, w) else resize_chw(np.ascontiguousarray(logits), (h, w))
            total = logits if total is None else total + logits
    return total / (len(scales) * (2 if flip else 1))
