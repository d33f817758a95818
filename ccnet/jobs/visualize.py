"""job=visualize checkpoint=RUN_DIR_OR_FILE [image=PATH] [point=[y,x]]: one point's attention, loop by loop.

The paper's figure: the image with the point marked, then the point's attention map after loop 1 (its row and
column) and after loop 2 (the whole image). ccnet/engine/attention.py computes the maps (how loops compose);
attention_figure here draws them (job=explore draws the same). Without `image`, the first val image of the
checkpoint's data set; without `point`, the innermost pixel of the object nearest the image centre (the image
centre for an image without a label). Saves attention_<image>_y<y>_x<x>.png into the run folder and the same
picture to TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from ccnet.data.datasets import build_dataset, read_image
from ccnet.data.transforms import eval_transform
from ccnet.engine.attention import attention_maps_at
from ccnet.registry import JOBS

from .common import SummaryWriter
from .restore import restore_model

log = logging.getLogger(__name__)


def default_point(label: np.ndarray | None, shape) -> tuple[int, int]:
    """The innermost pixel of the labelled object (class > 0, not ignore) nearest the image centre; the image
    centre for an image without a label or objects."""
    centre = np.array([shape[0] / 2, shape[1] / 2])
    if label is None or not ((label > 0) & (label != 255)).any():
        return int(centre[0]), int(centre[1])
    count, components, _, centroids = cv2.connectedComponentsWithStats(((label > 0) & (label != 255)).astype(np.uint8))
    nearest = 1 + int(np.argmin(np.linalg.norm(centroids[1:, ::-1] - centre, axis=1)))
    depth = cv2.distanceTransform((components == nearest).astype(np.uint8), cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(y), int(x)


def attention_figure(image: np.ndarray, point, maps: list[np.ndarray], min_height: int = 128) -> np.ndarray:
    """RGB uint8: the image with the point marked, then one heat-map overlay per loop (titled), side by side
    (stacked for wide images), enlarged to at least min_height pixels high."""
    h, w = image.shape[:2]
    scale = max(1, -(-min_height // h))
    y, x = (int(c * scale + scale // 2) for c in point)
    panels = [("input", image)]
    for r, m in enumerate(maps, 1):
        panels.append((f"loop {r}", heat_overlay(image, m)))
    tiles = []
    for title, panel in panels:
        big = cv2.resize(panel, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        cv2.drawMarker(big, (x, y), (0, 255, 0), cv2.MARKER_CROSS, 14, 2)
        strip = np.full((20, big.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, title, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([strip, big], axis=0))
    return np.concatenate(tiles, axis=0 if w > h else 1)


def heat_overlay(image: np.ndarray, m: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """RGB uint8: a map in OpenCV's JET colours (scaled to its maximum) blended over the image."""
    heat = cv2.applyColorMap(np.uint8(255 * m / max(float(m.max()), 1e-12)), cv2.COLORMAP_JET)[:, :, ::-1]
    return (round(1 - opacity, 6) * image + opacity * heat).astype(np.uint8)  # 0.45 exactly at the default


@JOBS.register("visualize")
def run(cfg, run_dir: Path) -> None:
    model, state, _ = restore_model(cfg, run_dir, adopt_dataset=True)
    if cfg.image:
        image, label, name = read_image(str(Path(cfg.image).expanduser())), None, Path(cfg.image).stem
    else:
        val_set = build_dataset(cfg.dataset, cfg.dataset.val_split)
        (image, label), name = val_set.read(0), Path(val_set.pairs[0][0]).stem
    y, x = (int(c) for c in cfg.point) if cfg.point else default_point(label, image.shape)
    if not (0 <= y < image.shape[0] and 0 <= x < image.shape[1]):
        raise ValueError(f"point=[{y},{x}] lies outside the {image.shape[0]}x{image.shape[1]} image (give [y,x])")
    maps = attention_maps_at(model, eval_transform(image, cfg.dataset), (y, x))
    figure = attention_figure(image, (y, x), maps)
    out = run_dir / f"attention_{name}_y{y}_x{x}.png"
    cv2.imwrite(str(out), figure[:, :, ::-1])
    with SummaryWriter(str(run_dir / "tb")) as writer:
        writer.add_image(f"attention/{name}_y{y}_x{x}", figure, state["iteration"], dataformats="HWC")
    log.info("attention of pixel (y=%d, x=%d) over %d loop(s) -> %s", y, x, len(maps), out)
