"""Inference on one image: whole, sliding window, multi-scale with flip; the test protocols of the zoo presets.

`predict` takes a normalised C x H x W float32 NumPy image; `predict_image` an H x W x 3 uint8 RGB image, to which
it applies the eval config's protocol (`prepare_views` + `predict_views`, the same two steps evaluation runs, the
first in the loader's threads). All return logits (classes x H x W, NumPy float32) at the image's size; `model` is
any callable mapping a (1, 3, h, w) jittor Var to (1, classes, h, w) logits.

Two protocols:
- without `eval.resize` (ours, the authors'): the image is normalised once; another scale resizes the normalised
  image, and its logits come back to the image's size with OpenCV's bilinear resize;
- with `eval.resize` = [long, short] (mmsegmentation's test pipeline): for each scale ratio the uint8 image is
  resized, keeping its ratio, to fit ratio x that bound (mmcv's rule, `rescale_size`), then normalised; logits
  come back to the image's (the label's) size with the model's align_corners.
`eval.average`: logits (the authors) or probs (mmseg: softmax probabilities); `eval.pad_windows`: a window
larger than the image is padded with 0, the mean colour (the authors), or cut to the image (mmseg).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ccnet import runtime
from ccnet.data.transforms import rescale_size  # mmcv's keep-ratio rule, shared with the training resize

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


def predict_sliding(model, image: np.ndarray, tile, stride, pad: bool = True) -> np.ndarray:
    """Windows of `tile` every `stride`; images smaller than a tile are padded (with 0: the mean colour), or with
    pad=False run in windows cut to the image (mmsegmentation's slide_inference)."""
    c, h, w = image.shape
    th, tw = tile if pad else (min(tile[0], h), min(tile[1], w))
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


def resize_logits(logits: np.ndarray, size_hw, align_corners: bool) -> np.ndarray:
    """Bilinear resize of classes x h x w float32 logits to size_hw (PyTorch's maths for either align_corners), by
    gathering the two neighbours along each axis: O(output), not the dense matrices the model uses on 1/8 maps."""
    from ccnet.models.ccnet import bilinear_taps

    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if logits.shape[1:] == (out_h, out_w):
        return logits
    top, bottom, fy = bilinear_taps(out_h, logits.shape[1], align_corners)
    left, right, fx = bilinear_taps(out_w, logits.shape[2], align_corners)
    fy, fx = fy.astype(np.float32)[:, None], fx.astype(np.float32)
    rows = logits[:, top] * (1 - fy) + logits[:, bottom] * fy
    return np.ascontiguousarray(rows[:, :, left] * (1 - fx) + rows[:, :, right] * fx, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(0, keepdims=True))
    return z / z.sum(0, keepdims=True)


def scaled_sizes(h: int, w: int, scales=(1.0,), resize=None) -> list[tuple[int, int]]:
    """The size the image is brought to for each scale ratio: without resize, ratio x the image (rounded); with
    resize = (long, short), the keep-ratio rescale to (int(long x ratio), int(short x ratio)) as mmsegmentation's
    MultiScaleFlipAug + Resize(keep_ratio=True) do (img_scale (2048, 1024): a 1024x2048 image stays as it is)."""
    if resize:
        return [rescale_size(h, w, (int(resize[0] * s), int(resize[1] * s))) for s in scales]
    return [(max(1, int(round(h * s))), max(1, int(round(w * s)))) for s in scales]


def predict_views(
    model, views, size_hw, mode="whole", tile=None, stride=None, flip=False, average="logits", pad_windows=True,
    align_corners=None,
) -> np.ndarray:  # fmt: skip
    """Logits of every view (and its mirror) back at size_hw, averaged as logits or as probabilities (softmax).

    align_corners None: a view of another size comes back with OpenCV's bilinear resize (resize_chw); True or
    False: with PyTorch's maths for it (resize_logits), as mmsegmentation brings its logits to the label's size.
    """
    if average not in ("logits", "probs"):
        raise ValueError(f"eval.average={average!r}: expected logits or probs")
    total, count = None, 0
    for view in views:
        for flipped in (False, True) if flip else (False,):
            x = np.ascontiguousarray(view[:, :, ::-1]) if flipped else view
            if mode == "whole":
                logits = predict_whole(model, x)
            elif mode == "slide":
                if tile is None or stride is None:
                    raise ValueError("eval.mode=slide needs eval.crop_size and eval.stride (e.g. eval=slide_769)")
                logits = predict_sliding(model, x, tile, stride, pad_windows)
            else:
                raise ValueError(f"eval.mode={mode!r}: expected whole or slide")
            if flipped:
                logits = logits[:, :, ::-1]
            if logits.shape[1:] != tuple(size_hw):
                logits = np.ascontiguousarray(logits)
                if align_corners is None:
                    logits = resize_chw(logits, size_hw)
                else:
                    logits = resize_logits(logits, size_hw, align_corners)
            if average == "probs":
                logits = softmax(logits)
            total = logits if total is None else total + logits
            count += 1
    return total / count


def predict(
    model, image: np.ndarray, mode="whole", tile=(769, 769), stride=(513, 513), scales=(1.0,), flip=False,
    average="logits", pad_windows=True,
) -> np.ndarray:  # fmt: skip
    """Logits averaged over windows, scales (and horizontal flips), at the normalised image's size; scales resize
    the normalised image."""
    h, w = image.shape[1:]
    views = (
        image if size == (h, w) else np.ascontiguousarray(resize_chw(image, size))
        for size in scaled_sizes(h, w, scales)
    )
    return predict_views(model, views, (h, w), mode, tile, stride, flip, average, pad_windows)


def prepare_views(image: np.ndarray, cfg_dataset, cfg_eval) -> tuple[list, tuple[int, int]]:
    """An H x W x 3 uint8 RGB image -> (its normalised C x H x W views, one per eval scale; (H, W)): the part of the
    protocol that needs no model (the evaluation runs it in the loader's threads). See the module docstring."""
    from ccnet.data.transforms import eval_transform

    h, w = image.shape[:2]
    resize = cfg_eval.get("resize")
    if not resize:  # normalise once; other scales resize the normalised image
        x = eval_transform(image, cfg_dataset)
        sizes = scaled_sizes(h, w, cfg_eval.scales)
        return [x if size == (h, w) else np.ascontiguousarray(resize_chw(x, size)) for size in sizes], (h, w)
    image = np.ascontiguousarray(image)  # OpenCV refuses the reversed-channel views image readers return
    views = []
    for size in scaled_sizes(h, w, cfg_eval.scales, resize):  # the pixels resized (bilinear, as mmcv), then normalised
        pixels = image if size == (h, w) else cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        views.append(eval_transform(pixels, cfg_dataset))
    return views, (h, w)


def predict_prepared(model, prepared, cfg_eval) -> np.ndarray:
    """The model's part of the protocol on prepare_views' output: classes x H x W logits at the image's size."""
    views, size = prepared
    e = cfg_eval
    align_corners = getattr(model, "align_corners", True) if e.get("resize") else None
    average, pad = e.get("average", "logits"), e.get("pad_windows", True)
    return predict_views(model, views, size, e.mode, e.crop_size, e.stride, e.flip, average, pad, align_corners)


def predict_image(model, image: np.ndarray, cfg_dataset, cfg_eval) -> np.ndarray:
    """The whole evaluation protocol of cfg_eval on one H x W x 3 uint8 RGB image -> classes x H x W logits."""
    return predict_prepared(model, prepare_views(image, cfg_dataset, cfg_eval), cfg_eval)
