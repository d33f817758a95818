"""job=visualize checkpoint=RUN_DIR_OR_FILE [image=PATH] [point=[y,x]]: one point's attention, loop by loop.

The paper's figure: the image with the point marked, then the point's attention map after loop 1 (its row and
column) and after loop 2 (the whole image); see ccnet/engine/attention.py for how loops are composed. Without
`image`, the first val image of the checkpoint's data set; without `point`, the innermost pixel of the
object nearest the image centre (the image centre for an image without a label). Saves
attention_<image>_y<y>_x<x>.png into the run folder and the same picture to TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from ccnet.data.datasets import build_dataset, read_image
from ccnet.data.transforms import eval_transform
from ccnet.engine.attention import attention_figure, attention_maps_at
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
