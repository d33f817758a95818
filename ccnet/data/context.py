"""The context data set: a region's class can only be read from a marker far away in its own row.

Every image (32 x 256) holds one grey blob near the RIGHT border; blobs look alike whatever their class (shape,
size and grey level are drawn independently of it). The class is the colour (red, green or blue) of a marker
strip, 32 px wide, at the LEFT border on the blob's rows; marker and blob are labelled with that class. They
are at least 176 px apart: beyond the theoretical receptive field of resnet_tiny + the RCCA head's convs (about
300 px wide, i.e. +-150 px; the effective field is far smaller). So a model without attention labels the
markers (a local colour) but can only guess the blobs' class, while one criss-cross pass links every blob pixel
to its row's marker. Labelling the markers matters for learning: their features then already point to their
class, and attention only has to carry them over (with unlabelled markers, CCA's gamma, which starts at 0, often
did not pick the context up within a few thousand iterations). A 2-pixel band around each blob is ignore (255).
Layout as the shapes data set: `images/<split>/NNNN.png`, `labels/<split>/NNNN.png`, `<split>.txt`.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ccnet.registry import DATASETS

from .datasets import DatasetFacts, SegmentationDataset
from .files import pairs_from_list
from .synthetic import write_split_folder

CONTEXT_CLASSES = ("background", "red_row", "green_row", "blue_row")
CONTEXT_VERSION = "context_v7"  # bump when the generator changes
MARKER_COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 80, 230]], np.float32)
CONTEXT_FACTS = DatasetFacts(CONTEXT_CLASSES, np.concatenate([[[0, 0, 0]], MARKER_COLOURS]).astype(np.uint8))
HEIGHT, WIDTH, MARKER_WIDTH, GAP = 32, 256, 32, 176  # blobs start GAP px right of the markers


def make_context_scene(rng: np.random.Generator):
    """One (image RGB uint8 32 x 256, label uint8) pair."""
    xx = np.arange(WIDTH, dtype=np.float32)
    image = np.full((HEIGHT, WIDTH, 3), rng.uniform(60, 110), np.float32)
    image += 20 * np.sin(xx / rng.uniform(20, 60))[None, :, None]
    half_w, half_h = rng.uniform(14, 22), rng.uniform(9, 13)
    cy = rng.uniform(half_h + 2, HEIGHT - half_h - 2)
    cx = rng.uniform(MARKER_WIDTH + GAP + half_w, WIDTH - half_w - 4)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    if rng.random() < 0.5:
        cv2.ellipse(mask, (int(cx), int(cy)), (int(half_w), int(half_h)), 0, 0, 360, 1, -1, cv2.LINE_AA)
    else:
        cv2.rectangle(mask, (int(cx - half_w), int(cy - half_h)), (int(cx + half_w), int(cy + half_h)), 1, -1)
    mask = mask.astype(bool)
    cls = int(rng.integers(1, len(CONTEXT_CLASSES)))
    image[mask] = rng.uniform(170, 220)
    rows = slice(int(cy - half_h), int(cy + half_h) + 1)
    image[rows, :MARKER_WIDTH] = MARKER_COLOURS[cls - 1]
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    label[mask] = label[rows, :MARKER_WIDTH] = cls
    label[cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0] = 255
    image = image + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def ensure_context_dataset(root: str | os.PathLike, splits=(("train", 400), ("val", 100)), seed: int = 0) -> Path:
    """Generate the data set under root/<CONTEXT_VERSION> unless it is already complete; returns that folder."""
    final = Path(os.path.expanduser(str(root))) / CONTEXT_VERSION
    return write_split_folder(
        final, splits, lambda split_index, i: make_context_scene(np.random.default_rng([seed, split_index, i]))
    )


@DATASETS.register("context", facts=lambda section: CONTEXT_FACTS)
def build_context(cfg, split: str) -> SegmentationDataset:
    """The embedded context data set (a blob's class is set by a marker far away in its row); see context.py."""
    root = ensure_context_dataset(cfg.root)
    return SegmentationDataset(
        name="context",
        pairs=pairs_from_list(root, split, "images", "labels", ".png", ".png"),
        class_names=CONTEXT_FACTS.class_names,
        ignore_index=cfg.ignore_index,
        palette=CONTEXT_FACTS.palette,
    )
