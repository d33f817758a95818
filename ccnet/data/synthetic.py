"""The embedded data set: seeded synthetic shape scenes written once in a real on-disk layout.

Each class is a shape (disc, square, triangle, ring, cross, bar) drawn at random scale and rotation; fill colours
and textures are drawn from one pool shared by all classes, so colour alone cannot tell them apart. The
background is a noisy gradient, every image gets sensor noise, and a 2-pixel band around each object is
labelled 255 (ignore), as in Pascal VOC. Layout: `images/<split>/NNNN.png`, `labels/<split>/NNNN.png`,
`<split>.txt` (one name a line).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ccnet.registry import DATASETS

from .datasets import DatasetFacts, SegmentationDataset, default_palette
from .files import pairs_from_list

SHAPES_CLASSES = ("background", "disc", "square", "triangle", "ring", "cross", "bar")
SHAPES_FACTS = DatasetFacts(SHAPES_CLASSES, default_palette(len(SHAPES_CLASSES)))
SHAPES_VERSION = "shapes_v1"  # bump when the generator changes, so old caches are not reused


def _rotated(points: np.ndarray, angle: float, center) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (points @ np.array([[c, s], [-s, c]])) + np.asarray(center)


def _shape_mask(cls: str, size: int, center, radius: float, angle: float) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    r = radius
    if cls == "disc":
        cv2.circle(mask, (int(center[0]), int(center[1])), int(r), 1, -1, cv2.LINE_AA)
    elif cls == "ring":
        cv2.circle(mask, (int(center[0]), int(center[1])), int(r), 1, -1, cv2.LINE_AA)
        cv2.circle(mask, (int(center[0]), int(center[1])), int(r * 0.55), 0, -1, cv2.LINE_AA)
    else:
        if cls == "square":
            polys = [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * r * 0.8]
        elif cls == "triangle":
            polys = [np.array([[0, -1], [0.87, 0.5], [-0.87, 0.5]]) * r]
        elif cls == "cross":
            arm = np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]]) * r
            polys = [arm, arm[:, ::-1]]
        elif cls == "bar":
            polys = [np.array([[-1, -0.25], [1, -0.25], [1, 0.25], [-1, 0.25]]) * r * 1.2]
        else:
            raise ValueError(cls)
        for poly in polys:
            cv2.fillPoly(mask, [np.round(_rotated(poly, angle, center)).astype(np.int32)], 1, cv2.LINE_AA)
    return mask


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB texture (size, size, 3) float: flat, stripes, checker or blotches in 1-2 pool colours."""
    pool = np.array(
        [
            [220, 60, 50],
            [60, 170, 70],
            [50, 90, 210],
            [230, 200, 60],
            [160, 70, 190],
            [70, 190, 200],
            [240, 140, 40],
            [120, 120, 120],
        ],
        np.float32,
    )
    a, b = pool[rng.choice(len(pool), 2, replace=False)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        t = np.zeros((size, size), np.float32)
    elif kind == 1:
        period, theta = rng.uniform(6, 14), rng.uniform(0, np.pi)
        t = (np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        cell = int(rng.integers(5, 12))
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    else:
        t = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 4)
        t = (t > np.median(t)).astype(np.float32)
    return a * (1 - t[..., None]) + b * t[..., None]


def make_scene(rng: np.random.Generator, size: int, n_classes: int = len(SHAPES_CLASSES)):
    """One (image RGB uint8, label uint8) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, (2, 3)).astype(np.float32)
    w = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    image = c0 + (c1 - c0) * (w - w.min()) / (np.ptp(w) + 1e-6)
    image = image + 0.5 * (_texture(rng, size) - 128) * rng.uniform(0.0, 0.4)
    label = np.zeros((size, size), np.uint8)
    ignore = np.zeros((size, size), bool)
    occupied = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, n_classes))
        for _attempt in range(20):  # objects touch at most a little, so each shape stays recognisable
            radius = rng.uniform(0.08, 0.24) * size
            center = rng.uniform(radius, size - radius, 2)
            angle = rng.uniform(0, 2 * np.pi)
            mask = _shape_mask(SHAPES_CLASSES[cls], size, center, radius, angle).astype(bool)
            if (mask & occupied).sum() <= 0.05 * mask.sum():
                break
        occupied |= mask
        image[mask] = _texture(rng, size)[mask]
        label[mask] = cls
        band = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        ignore = (ignore & ~mask) | band
    image = image + rng.normal(0, 8, image.shape)
    label[ignore] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def ensure_shapes_dataset(
    root: str | os.PathLike, splits=(("train", 320), ("val", 80)), size: int = 160, seed: int = 0
) -> Path:
    """Generate the data set under root/shapes_v1 unless it is already complete; returns that folder.

    Written into a temporary sibling folder and renamed, so an interrupted run never leaves half a data set.
    """
    final = Path(os.path.expanduser(str(root))) / SHAPES_VERSION
    return write_split_folder(final, splits, lambda s, i: make_scene(np.random.default_rng([seed, s, i]), size))


def write_split_folder(final: Path, splits, make) -> Path:
    """Write make(split_index, i) -> (image RGB, label) pairs into final/ in our layout, unless already done."""
    if (final / "DONE").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        for split_index, (split, count) in enumerate(splits):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            names = []
            for i in range(count):
                image, label = make(split_index, i)
                name = f"{i:04d}"
                cv2.imwrite(str(tmp / "images" / split / f"{name}.png"), image[:, :, ::-1])
                cv2.imwrite(str(tmp / "labels" / split / f"{name}.png"), label)
                names.append(name)
            (tmp / f"{split}.txt").write_text("\n".join(names) + "\n")
        (tmp / "DONE").write_text("complete\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@DATASETS.register("embedded", facts=lambda section: SHAPES_FACTS)
def build_embedded(cfg, split: str) -> SegmentationDataset:
    """The embedded shapes data set; generated on first use under dataset.root (a cache folder)."""
    root = ensure_shapes_dataset(cfg.root)
    return SegmentationDataset(
        name="embedded",
        pairs=pairs_from_list(root, split, "images", "labels", ".png", ".png"),
        class_names=SHAPES_FACTS.class_names,
        ignore_index=cfg.ignore_index,
        palette=SHAPES_FACTS.palette,
    )
