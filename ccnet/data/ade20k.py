"""ADE20K (the SceneParsing challenge, 150 classes). Stored labels: 0 = other (unlabelled), 1..150 the classes.

Two conventions, picked by the dataset config:
- reduce_zero_label=true (mmsegmentation, the default): 150 classes, 0 -> ignore, c -> c - 1;
- reduce_zero_label=false, num_classes=151, ignore_index=0 (the seed's runs): the stored values as they are,
  "other" is class 0 and is ignored in training and in the confusion matrix.
"""

from __future__ import annotations

from ccnet.registry import DATASETS

from .datasets import DataError, DatasetFacts, SegmentationDataset, default_palette, label_lut
from .files import dataset_root, pair_files, require_folder, require_split_folder

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
SPLIT_FOLDERS = {"train": "training", "val": "validation"}  # our split names -> the archive's folders

LAYOUT = """  images/{training,validation}/ADE_train_00000001.jpg, ADE_val_00000001.jpg, ...
  annotations/{training,validation}/<same name>.png (0 = other, 1..150 the classes)"""
SOURCE = (
    "`python run.py job=download dataset=ade20k` (fetched, checked and unpacked there), or by hand: "
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/), "
    "unzipped into dataset.root (its ADEChallengeData2016 folder is found there too)"
)


def ade20k_lut(reduce_zero_label: bool, ignore_index: int):
    if reduce_zero_label:
        return label_lut({0: ignore_index, **{c: c - 1 for c in range(1, len(ADE20K_CLASSES) + 1)}})
    return label_lut({c: c for c in range(len(ADE20K_CLASSES) + 1)})


def ade20k_facts(section) -> DatasetFacts:
    """150 classes with reduce_zero_label (the default), else 151: "other" (stored 0) first."""
    names = ADE20K_CLASSES if section.get("reduce_zero_label", True) else ("other",) + ADE20K_CLASSES
    return DatasetFacts(names, default_palette(len(names)))


@DATASETS.register("ade20k", facts=ade20k_facts)
def build_ade20k(cfg, split: str) -> SegmentationDataset:
    root = dataset_root(cfg.root, ("ADEChallengeData2016",))
    require_folder(root, "ADE20K", LAYOUT, SOURCE, ("images", "annotations"))
    if cfg.reduce_zero_label and 0 <= cfg.ignore_index < len(ADE20K_CLASSES):
        raise DataError(
            f"ADE20K: dataset.reduce_zero_label=true maps 0 to the ignore label, but dataset.ignore_index="
            f"{cfg.ignore_index} is a class id; use 255, or reduce_zero_label=false with num_classes=151"
        )
    folder = SPLIT_FOLDERS.get(split, split)
    image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
    require_split_folder(image_dir, split, "ADE20K")
    require_split_folder(label_dir, split, "ADE20K")
    pairs = pair_files(
        sorted({p.stem for p in image_dir.glob("*.jpg")} | {p.stem for p in label_dir.glob("*.png")}),
        lambda name: image_dir / f"{name}.jpg",
        lambda name: label_dir / f"{name}.png",
        f"ADE20K {folder} ({root})",
    )
    facts = ade20k_facts(cfg)
    return SegmentationDataset(
        name="ade20k",
        pairs=pairs,
        class_names=facts.class_names,
        ignore_index=cfg.ignore_index,
        label_lut=ade20k_lut(cfg.reduce_zero_label, cfg.ignore_index),
        palette=facts.palette,
        meta={"reduce_zero_label": bool(cfg.reduce_zero_label)},
    )
