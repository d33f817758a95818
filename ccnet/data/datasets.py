"""Data sets as lists of (image file, label file) pairs over one shared reader.

A data set module only has to find its pairs and say how a label file maps to train ids; reading, checking
and errors are shared. Each registers its builder(cfg, split) with `@DATASETS.register(name)`;
`build_dataset(cfg, split)` takes the `dataset` config section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ccnet.registry import DATASETS


class DataError(ValueError):
    """Bad or missing data; the message names the file and what was expected."""


@dataclass
class SegmentationDataset:
    name: str
    pairs: list[tuple[str, str]]  # (image path, label path)
    class_names: tuple[str, ...]
    ignore_index: int = 255
    label_lut: np.ndarray | None = None  # 256-entry map stored label value -> train id (-1: not a valid value)
    palette: np.ndarray | None = None  # (classes, 3) RGB colours for pictures
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 H x W x 3, train-id label int64 H x W) of one sample, checked."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = read_label(label_path, self.label_lut)
        if image.shape[:2] != label.shape:
            raise DataError(
                f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}; they must be the same size"
            )
        check_label_values(label, self.num_classes, self.ignore_index, label_path)
        return image, label

    def color(self, label: np.ndarray) -> np.ndarray:
        """Colourise a train-id map (ignore -> white)."""
        palette = self.palette if self.palette is not None else default_palette(self.num_classes)
        out = np.full(label.shape + (3,), 255, np.uint8)
        valid = (label >= 0) & (label < self.num_classes)
        out[valid] = palette[label[valid]]
        return out


def read_image(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        from ccnet.fileio import special_file

        raise DataError(f"{path}: {special_file(path) or 'image file not found'}")  # a FIFO would block forever
    data = np.fromfile(path, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    # OpenCV decodes a truncated JPEG without an error (grey bottom rows): a JPEG must end with its EOI marker
    truncated_jpeg = data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-32:].tobytes()
    if image is None or truncated_jpeg:
        raise DataError(f"{path}: cannot decode the image (unreadable, truncated or not an image)")
    return image[:, :, ::-1]


def read_label(path: str, lut: np.ndarray | None = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: label file not found")
    # OpenCV turns a palette PNG (Pascal VOC) into colours; Pillow gives its indices, the class ids
    label = read_palette_indices(path) if is_palette_png(path) else cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataError(f"{path}: cannot decode the label image (unreadable, truncated or not an image)")
    if label.ndim != 2:
        raise DataError(f"{path}: label must be a single-channel PNG of class ids, got shape {label.shape}")
    label = label.astype(np.int64)
    if lut is None:
        return label
    stored = label
    label = lut[np.minimum(stored, len(lut) - 1)]
    bad = (label < 0) | (stored >= len(lut))
    if bad.any():
        values = np.unique(stored[bad])[:10].tolist()
        raise DataError(f"{path}: stored label values {values} are not label values of this data set")
    return label


def is_palette_png(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 and head[25] == 3  # IHDR colour type 3


def read_palette_indices(path: str) -> np.ndarray | None:
    from PIL import Image  # installed with Jittor

    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError):
        return None


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, path: str) -> None:
    bad = (label >= num_classes) & (label != ignore_index) | (label < 0)
    if bad.any():
        values = np.unique(label[bad])[:10].tolist()
        raise DataError(
            f"{path}: label values {values} are neither a class id (0..{num_classes - 1}) nor the ignore "
            f"label {ignore_index}"
        )


def default_palette(n: int) -> np.ndarray:
    """The Pascal VOC colour map: distinct, stable colours for any number of classes."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def pairs_from_list(
    root: Path, split: str, image_dir: str, label_dir: str, image_ext: str, label_ext: str
) -> list[tuple[str, str]]:
    """Pairs named in root/<split>.txt (one stem a line), with clear errors for missing files."""
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: split list not found (expected one image name per line)")
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{list_file}: the split '{split}' is empty")
    pairs = []
    for name in names:
        image = root / image_dir / split / f"{name}{image_ext}"
        label = root / label_dir / split / f"{name}{label_ext}"
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                raise DataError(f"{path}: {what} of '{name}' listed in {list_file} is missing")
        pairs.append((str(image), str(label)))
    return pairs


def build_dataset(cfg, split: str) -> SegmentationDataset:
    """The data set `cfg.name` (registered in ccnet.registry.DATASETS by its module) for one split."""
    dataset = DATASETS.get(cfg.name).factory(cfg, split)
    if dataset.num_classes != cfg.num_classes:
        raise DataError(
            f"dataset.num_classes={cfg.num_classes}, but the {cfg.name} data set has {dataset.num_classes} classes"
        )
    return dataset


def verify_dataset(dataset: SegmentationDataset) -> list[str]:
    """Read every sample and return every problem found (empty list: all good)."""
    problems = []
    for i in range(len(dataset)):
        try:
            dataset.read(i)
        except DataError as err:
            problems.append(str(err))
    return problems
