"""Pascal VOC 2012 segmentation: 21 classes (background included), 255 = object borders (ignored).

Labels are palette PNGs (SegmentationClass; the class id is the palette index, not the colour) or, with the
SBD augmented set, grey-level PNGs (SegmentationClassAug). Splits are the lists
ImageSets/Segmentation/<split>.txt; split 'train' becomes 'train_aug' (10582 images, SegmentationClassAug
labels) when train_aug.txt and SegmentationClassAug are both present.
"""

from __future__ import annotations

import logging

from ccnet.registry import DATASETS

from .datasets import DataError, DatasetFacts, SegmentationDataset, default_palette, label_lut
from .files import dataset_root, pair_files, read_split_list, require_folder

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

LAYOUT = """  JPEGImages/<name>.jpg
  SegmentationClass/<name>.png (palette PNG) and/or SegmentationClassAug/<name>.png (SBD, grey levels)
  ImageSets/Segmentation/{train,val,train_aug}.txt (one <name> a line)"""
VOC_FACTS = DatasetFacts(VOC_CLASSES, default_palette(len(VOC_CLASSES)))
SOURCE = (
    "`python run.py job=download dataset=voc` (fetched, checked and unpacked there), or by hand: "
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar (unpacked: VOCdevkit/VOC2012, "
    "found under dataset.root too); the augmented labels from SBD, "
    "http://home.bharathh.info/pubs/codes/SBD/download.html (SegmentationClassAug + train_aug.txt)"
)


@DATASETS.register("voc", facts=lambda section: VOC_FACTS)
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
    label_dir = root / "SegmentationClass"
    if split == "train_aug" or not label_dir.is_dir():
        label_dir = aug
    pairs = pair_files(
        read_split_list(list_file, split),
        lambda name: root / "JPEGImages" / f"{name}.jpg",
        lambda name: label_dir / f"{name}.png",
        f"Pascal VOC {split} ({root})",
        listed_in=list_file,
    )
    return SegmentationDataset(
        name="voc",
        pairs=pairs,
        class_names=VOC_FACTS.class_names,
        ignore_index=cfg.ignore_index,
        label_lut=label_lut({**{c: c for c in range(len(VOC_CLASSES))}, 255: cfg.ignore_index}),
        palette=VOC_FACTS.palette,
        meta={"split": split, "labels": label_dir.name},
    )
