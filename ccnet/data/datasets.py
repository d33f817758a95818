"""Data sets as lists of (image file, label file) pairs over one shared reader.

A data set module declares its facts (class names and colours: `DatasetFacts`, the one place they are written,
read by the data set, the export and the loading of published models), finds its pairs (ccnet/data/files.py) and
says how a label file maps to train ids; reading, checking and errors are shared. Each registers its
builder(cfg, split) with `@DATASETS.register(name, facts=<function of the dataset section>)`;
`build_dataset(cfg, split)` takes the `dataset` config section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

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


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """256-entry map stored label value -> train id; values not in `mapping` -> -1 (an error when read)."""
    lut = np.full(256, -1, np.int64)
    for stored, train_id in mapping.items():
        lut[stored] = train_id
    return lut


@dataclass(frozen=True)
class DatasetFacts:
    """What is known of a data set without its files: its class names and their RGB colours (one row per class)."""

    class_names: tuple[str, ...]
    palette: np.ndarray


def dataset_facts(section) -> DatasetFacts:
    """The facts of a `dataset` config section (or the dataset section of a saved config: a plain dict), as its
    data set declares them (`@DATASETS.register(name, facts=...)`, a function of the section); "0", "1", ... and
    the default palette where the data set declares none or its class count differs from num_classes."""
    n, name = int(section["num_classes"]), section.get("name")
    if section.get("classes") is not None:  # the run's own names (a published file's meta)
        colours = section.get("palette")
        palette = np.asarray(colours, np.uint8).reshape(-1, 3) if colours is not None else default_palette(n)
        return DatasetFacts(tuple(str(c) for c in section["classes"]), palette)
    facts_of = DATASETS.get(name).info.get("facts") if name in DATASETS.names() else None  # unknown: an old file
    facts = facts_of(section) if facts_of is not None else None
    if facts is None or len(facts.class_names) != n:
        return DatasetFacts(tuple(str(i) for i in range(n)), default_palette(n))
    return facts


def dataset_with_classes(num_classes: int) -> str | None:
    """The one registered data set with `num_classes` classes in its default settings (a published model's data
    set, known by its classifier's size); None where none or several have that many."""
    found = [
        entry.name
        for entry in DATASETS.entries()
        if "facts" in entry.info and len(entry.info["facts"]({}).class_names) == num_classes
    ]
    return found[0] if len(found) == 1 else None


def build_dataset(cfg, split: str) -> SegmentationDataset:
    """The data set `cfg.name` (registered in ccnet.registry.DATASETS by its module) for one split."""
    dataset = DATASETS.get(cfg.name).factory(cfg, split)
    if dataset.num_classes != cfg.num_classes:
        raise DataError(
            f"dataset.num_classes={cfg.num_classes}, but the {cfg.name} data set has {dataset.num_classes} classes"
        )
    return named(dataset, cfg)


def named(dataset: SegmentationDataset, cfg) -> SegmentationDataset:
    """`dataset` with the class names and colours of cfg (dataset.classes / dataset.palette) where it sets them."""
    if cfg.get("classes") is not None:
        dataset = replace(dataset, class_names=tuple(str(n) for n in cfg.classes))
    if cfg.get("palette") is not None:
        dataset = replace(dataset, palette=np.asarray(cfg.palette, np.uint8).reshape(-1, 3))
    return dataset


def unlabelled(cfg, name: str) -> SegmentationDataset:
    """No files of the data set here (predict, explore of other images): its classes only, numbered where cfg
    names none, with the VOC colour map where it gives no colours."""
    return named(SegmentationDataset(name, [], tuple(map(str, range(cfg.num_classes)))), cfg)


def verify_dataset(dataset: SegmentationDataset) -> list[str]:
    """Read every sample and return every problem found (empty list: all good)."""
    problems = []
    for i in range(len(dataset)):
        try:
            dataset.read(i)
        except DataError as err:
            problems.append(str(err))
    return problems
