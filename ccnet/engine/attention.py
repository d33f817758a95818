"""Where one pixel's recurrent criss-cross attention reaches after each loop (the paper's attention figure).

Loop r gives every position p weights A_r[p, u] over the H + W - 1 positions u of p's criss-cross (its column
and row; one softmax, so they sum to 1), and its output is in_r(p) + gamma * sum_u A_r[p, u] v(in_r(u)).

- After loop 1, p's map is A_1[p, .]: its row and column only, summing to 1.
- Loop 2 reads, at each u of p's criss-cross, u's loop-1 output, which carries two things: u itself (the
  residual, the direct path) and what u gathered over ITS criss-cross in loop 1 (A_1[u, .]). We weigh the two
  halves equally (their true ratio depends on gamma and the feature norms, not on attention), so
      M_2[p, .] = sum_u A_2[p, u] * (delta_u + A_1[u, .]) / 2
  It still sums to 1, and it is positive at every pixel: any w = (y', x') is reached from p = (y, x) through
  u = (y, x') (p's row, then u's column) or u = (y', x) (p's column, then u's row).
- In general M_r = A_r N_{r-1} with N_0 = I and N_k = (I + M_k) / 2; for R = 1 this gives M_1 = A_1.

Maps are computed one row vector at a time: `spread(v, A)` is the product v A, using the criss-cross structure
(O(H W (H + W))), so no (HW x HW) matrix is ever formed.
"""

from __future__ import annotations

import cv2
import numpy as np

from ccnet import runtime

jt = runtime.ensure_setup()  # Jittor, set up first (a no-op after run.py's own set-up)


def spread(weights: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """(H, W) weights over positions u, (H, W, H + W) attention -> (H, W): out[w] = sum_u weights[u] A[u, w]."""
    h = weights.shape[0]
    column = np.einsum("yx,yxi->ix", weights, attention[..., :h])  # u = (y, x) reads (i, x)
    row = np.einsum("yx,yxj->yj", weights, attention[..., h:])  # u = (y, x) reads (y, j)
    return column + row


def point_maps(attentions: list[np.ndarray], y: int, x: int) -> list[np.ndarray]:
    """For loops r = 1..R, the (H, W) map M_r[p, .] of feature position p = (y, x); each sums to 1."""

    def through(v, k):  # v N_k, with N_0 = I and N_k = (I + A_k N_{k-1}) / 2
        return v if k == 0 else 0.5 * v + 0.5 * through(spread(v, attentions[k - 1]), k - 1)

    start = np.zeros(attentions[0].shape[:2], np.float64)
    start[y, x] = 1.0
    return [through(spread(start, attentions[r].astype(np.float64)), r) for r in range(len(attentions))]


def attention_maps_at(model, image: np.ndarray, point) -> list[np.ndarray]:
    """Per loop, the attention map of image pixel point = (y, x), upsampled to the image: (h, w) each.

    image: a normalised C x H x W float32 array; model: a CCNet with recurrence >= 1.
    """
    with jt.no_grad():
        _, feature = model.head_inputs(jt.array(image[None]))
        attentions = [a.numpy()[0] for a in model.head.attention_maps(feature)]
    if not attentions:
        raise ValueError("the model has recurrence 0 (no attention): there is no attention map to show")
    (h, w), (fh, fw) = image.shape[1:], attentions[0].shape[:2]
    y, x = point
    maps = point_maps(attentions, min(fh - 1, y * fh // h), min(fw - 1, x * fw // w))
    return [cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) for m in maps]


def attention_figure(image: np.ndarray, point, maps: list[np.ndarray], min_height: int = 128) -> np.ndarray:
    """RGB uint8: the image with the point marked, then one heat-map overlay per loop (titled), side by side
    (stacked for wide images), enlarged to at least min_height pixels high."""
    h, w = image.shape[:2]
    scale = max(1, -(-min_height // h))
    y, x = (int(c * scale + scale // 2) for c in point)
    panels = [("input", image)]
    for r, m in enumerate(maps, 1):
        heat = cv2.applyColorMap(np.uint8(255 * m / max(float(m.max()), 1e-12)), cv2.COLORMAP_JET)[:, :, ::-1]
        panels.append((f"loop {r}", (0.45 * image + 0.55 * heat).astype(np.uint8)))
    tiles = []
    for title, panel in panels:
        big = cv2.resize(panel, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        cv2.drawMarker(big, (x, y), (0, 255, 0), cv2.MARKER_CROSS, 14, 2)
        strip = np.full((20, big.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, title, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([strip, big], axis=0))
    return np.concatenate(tiles, axis=0 if w > h else 1)
