"""Cityscapes (fine annotations): 19 evaluated classes, everything else ignored; test-server submission PNGs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ccnet.registry import DATASETS

from .datasets import DatasetFacts, SegmentationDataset, label_lut
from .files import dataset_root, pair_files, require_folder, require_split_folder

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
# The official colours (cityscapesscripts labels.py), RGB, in train-id order.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
        (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
        (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    np.uint8,
)  # fmt: skip
CITYSCAPES_FACTS = DatasetFacts(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)
# The label id (0..33, as stored in *_gtFine_labelIds.png) of each train id; the other 15 ids are ignored.
LABEL_ID_OF_TRAIN_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
NUM_LABEL_IDS = 34

LAYOUT = """  leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)"""
SOURCE = (
    "`python run.py job=download dataset=cityscapes` (fetched, checked and unpacked there), or by hand: "
    "https://www.cityscapes-dataset.com/downloads/ (free registration): leftImg8bit_trainvaltest.zip and "
    "gtFine_trainvaltest.zip, both unzipped into dataset.root"
)


def label_id_lut(ignore_index: int) -> np.ndarray:
    """Stored label id -> train id: the 19 evaluated ids to 0..18, the other label ids to ignore."""
    mapping = dict.fromkeys(range(NUM_LABEL_IDS), ignore_index)
    mapping.update({label_id: train_id for train_id, label_id in enumerate(LABEL_ID_OF_TRAIN_ID)})
    return label_lut(mapping)


def train_id_lut(ignore_index: int) -> np.ndarray:
    """Stored *_labelTrainIds.png value -> train id: 0..18 as they are, 255 to ignore."""
    return label_lut({**{i: i for i in range(len(CITYSCAPES_CLASSES))}, 255: ignore_index})


def files_by_name(folder: Path, suffix: str) -> dict[str, Path]:
    """'<city>/<city>_<seq>_<frame>' -> file, for folder/<city>/*<suffix>."""
    return {f"{p.parent.name}/{p.name[: -len(suffix)]}": p for p in folder.glob(f"*/*{suffix}")}


@DATASETS.register("cityscapes", facts=lambda section: CITYSCAPES_FACTS)
def build_cityscapes(cfg, split: str) -> SegmentationDataset:
    """Pairs leftImg8bit/<split> with gtFine/<split>: the labelTrainIds PNGs when every image has one, else
    the labelIds PNGs mapped to train ids."""
    root = dataset_root(cfg.root, ("cityscapes",))
    require_folder(root, "Cityscapes", LAYOUT, SOURCE, ("leftImg8bit", "gtFine"))
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    require_split_folder(image_dir, split, "Cityscapes")
    require_split_folder(label_dir, split, "Cityscapes")
    images = files_by_name(image_dir, "_leftImg8bit.png")
    train_ids = files_by_name(label_dir, "_gtFine_labelTrainIds.png")
    use_train_ids = bool(images) and images.keys() <= train_ids.keys()
    suffix = "_gtFine_labelTrainIds.png" if use_train_ids else "_gtFine_labelIds.png"
    labels = train_ids if use_train_ids else files_by_name(label_dir, suffix)
    pairs = pair_files(
        sorted(images.keys() | labels.keys()),
        lambda name: image_dir / f"{name}_leftImg8bit.png",
        lambda name: label_dir / f"{name}{suffix}",
        f"Cityscapes {split} ({root})",
    )
    lut = train_id_lut(cfg.ignore_index) if use_train_ids else label_id_lut(cfg.ignore_index)
    return SegmentationDataset(
        name="cityscapes",
        pairs=pairs,
        class_names=CITYSCAPES_FACTS.class_names,
        ignore_index=cfg.ignore_index,
        label_lut=lut,
        palette=CITYSCAPES_FACTS.palette,
        meta={"labels": suffix, "write_submission": write_submission},
    )


def write_submission(pred: np.ndarray, image_path: str, out_dir: Path) -> Path:
    """Save a train-id prediction as the benchmark wants it: label ids, uint8 PNG, named after the image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / Path(image_path).name  # <city>_<seq>_<frame>_leftImg8bit.png
    label_ids = np.asarray(LABEL_ID_OF_TRAIN_ID, np.uint8)[pred]
    if not cv2.imwrite(str(path), label_ids):
        raise OSError(f"{path}: cannot write the submission PNG")
    return path
