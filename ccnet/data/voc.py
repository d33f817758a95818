"""Pascal VOC 2012 segmentation: 21 classes (background included), 255 = object borders (ignored).

Labels are palette PNGs (SegmentationClass; the class id is the palette index, not the colour) or, with the
SBD augmented set, grey-level PNGs (SegmentationClassAug). Splits are the lists
ImageSets/Segmentation/<split>.txt; split 'train' becomes 'train_aug' (10582 images, SegmentationClassAug
labels) when train_aug.txt and SegmentationClassAug are both present.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ccnet.registry import DATASETS

from .datasets import DataError, SegmentationDataset, default_palette
from .folders import dataset_root, label_lut, problems_error, require_folder

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

LAYOUT = """  JPEGImages/<name>.jpg
  SegmentationClass/<name>.png (palette PNG) and/or SegmentationClassAug/<name>.png (SBD, grey levels)
  ImageSets/Segmentation/{train,val,train_aug}.txt (one <name> a line)"""
SOURCE = (
    "`python run.py job=download dataset=voc` (fetched, checked and unpacked there), or by hand: "
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar (unpacked: VOCdevkit/VOC2012, "
    "found under dataset.root too); the augmented labels from SBD, "
    "http://home.bharathh.info/pubs/codes/SBD/download.html (SegmentationClassAug + train_aug.txt)"
)


@DATASETS.register("voc")
def build_voc(cfg, split: str) -> SegmentationDataset:
    root = dataset_root(cfg.root, ("VOCdevkit/VOC2012", "VOC2012"))
    require_folder(root, "Pascal VOC 2012", LAYOUT, SOURCE, ("JPEGImages", "ImageSets/Segmentation"))
    lists, aug = root / "ImageSets" / "Segmentation", root / "SegmentationClassAug"
    if split == "train" and (lists / "train_aug.txt").is_file() and aug.is_dir():
        log.info("Pascal VOC: using the augmented training set (train_aug.txt, SegmentationClassAug)")
        split = "train_aug"
    list_file = lists / f"{split}.txt"
    if not list_file.is_file():
        found = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
        raise DataError(f"Pascal VOC: {list_file} not found for split '{split}' (lists found there: {found})")
    # a line is '<name>' or, in some lists, '/JPEGImages/<name>.jpg /SegmentationClassAug/<name>.png'
    names = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"Pascal VOC: {list_file}: the split '{split}' is empty")
    label_dir = root / "SegmentationClass"
    if split == "train_aug" or not label_dir.is_dir():
        label_dir = aug
    pairs, problems = [], []
    for name in names:
        image, label = root / "JPEGImages" / f"{name}.jpg", label_dir / f"{name}.png"
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                problems.append(f"{path}: {what} of '{name}' (listed in {list_file}) is missing")
        pairs.append((str(image), str(label)))
    if problems:
        raise problems_error(f"Pascal VOC {split} ({root})", problems)
    return SegmentationDataset(
        name="voc",
        pairs=pairs,
        class_names=VOC_CLASSES,
        ignore_index=cfg.ignore_index,
        label_lut=label_lut({**{c: c for c in range(len(VOC_CLASSES))}, 255: cfg.ignore_index}),
        palette=default_palette(len(VOC_CLASSES)),
        meta={"split": split, "labels": label_dir.name},
    )
