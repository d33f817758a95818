"""Cityscapes, ADE20K and Pascal VOC on tiny trees written in each real on-disk format, and every bad input."""

import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from ccnet.data.datasets import DataError, build_dataset, default_palette, verify_dataset
from ccnet.data.loader import train_batches
from ccnet.data.transforms import train_transform

H, W = 6, 8
# The official table (cityscapesscripts labels.py): label id -> train id of the 19 evaluated classes.
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
CITYSCAPES_TRAIN_ID.update({26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})


def random_image(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def every_label_id():
    """H x W uint8 holding each of the 34 Cityscapes label ids at least once."""
    return (np.arange(H * W) % 34).reshape(H, W).astype(np.uint8)


def write_cityscapes(root: Path, split="val", names=("aachen/aachen_000000_000019", "bonn/bonn_000001_000002")):
    for i, name in enumerate(names):
        image = root / "leftImg8bit" / split / f"{name}_leftImg8bit.png"
        label = root / "gtFine" / split / f"{name}_gtFine_labelIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image), random_image(i))
        cv2.imwrite(str(label), every_label_id())
    return root


def write_ade20k(root: Path, folder="validation", count=2):
    for i in range(count):
        name = f"ADE_val_{i + 1:08d}"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / folder / f"{name}.jpg"), random_image(i))
        cv2.imwrite(str(root / "annotations" / folder / f"{name}.png"), ade_label())
    return root


def ade_label():
    return (np.arange(H * W) * 3 % 151).reshape(H, W).astype(np.uint8)  # 0 (other) and classes up to 150


def voc_label():
    label = (np.arange(H * W) % 21).reshape(H, W).astype(np.uint8)
    label[0, :3] = 255  # object border
    return label


def write_palette_png(path: Path, indices: np.ndarray):
    image = Image.fromarray(indices, mode="P")
    image.putpalette(default_palette(256).reshape(-1).tolist())  # the VOC colour map, as in the real files
    image.save(path)


def write_voc(root: Path, splits=(("train", 2), ("val", 1)), aug=False):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for split, count in splits:
        split_names = [f"2007_{len(names) + i:06d}" for i in range(count)]
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(split_names) + "\n")
        names += split_names
    for i, name in enumerate(names):
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), random_image(i))
        write_palette_png(root / "SegmentationClass" / f"{name}.png", voc_label())
    if aug:  # SBD: grey-level PNGs and the train_aug list
        (root / "SegmentationClassAug").mkdir()
        aug_names = names + ["2008_000001"]
        for i, name in enumerate(aug_names):
            cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), random_image(i))
            cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), np.full((H, W), i % 21, np.uint8))
        (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(aug_names) + "\n")
    return root


def dataset_cfg(compose, name, root, *overrides):
    return compose([f"dataset={name}", f"dataset.root={root}", *overrides]).dataset


# ------------------------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_maps_all_34_label_ids(compose, tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    val = build_dataset(dataset_cfg(compose, "cityscapes", root), "val")
    assert len(val) == 2 and val.num_classes == 19 and val.class_names[0] == "road"
    assert Path(val.pairs[0][0]).name == "aachen_000000_000019_leftImg8bit.png"
    image, label = val.read(1)
    expected = np.vectorize(lambda i: CITYSCAPES_TRAIN_ID.get(int(i), 255))(every_label_id())
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(image, random_image(1)[:, :, ::-1])  # written BGR by OpenCV, read as RGB
    assert set(np.unique(label)) == set(range(19)) | {255}


def test_cityscapes_prefers_train_id_pngs(compose, tmp_path):
    root = write_cityscapes(tmp_path)
    train_ids = np.full((H, W), 255, np.uint8)
    train_ids[0] = np.arange(W)
    for path in (root / "gtFine" / "val").glob("*/*_labelIds.png"):
        cv2.imwrite(str(path).replace("_labelIds", "_labelTrainIds"), train_ids)
    val = build_dataset(dataset_cfg(compose, "cityscapes", root), "val")
    assert val.pairs[0][1].endswith("_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(val.read(0)[1], train_ids)


def test_cityscapes_palette_is_official(compose, tmp_path):
    val = build_dataset(dataset_cfg(compose, "cityscapes", write_cityscapes(tmp_path)), "val")
    picture = val.color(np.array([[0, 13, 18, 255]]))
    assert picture[0].tolist() == [[128, 64, 128], [0, 0, 142], [119, 11, 32], [255, 255, 255]]


def test_loader_on_cityscapes(compose, tmp_path):
    root = write_cityscapes(tmp_path, split="train")
    cfg = compose(["dataset=cityscapes", f"dataset.root={root}", "schedule.crop_size=[4,4]"])
    train = build_dataset(cfg.dataset, "train")
    batches = train_batches(train, lambda im, lb, rng: train_transform(im, lb, rng, cfg.dataset, cfg.schedule), 2, 0)
    images, labels = next(batches)
    batches.close()
    assert images.shape == (2, 3, 4, 4) and images.dtype == np.float32 and labels.shape == (2, 4, 4)
    assert set(np.unique(labels)) <= set(range(19)) | {255}


# -------------------------------------------------------------------------------------------------- ADE20K


def test_ade20k_reduce_zero_label_default(compose, tmp_path):
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    cfg = dataset_cfg(compose, "ade20k", tmp_path)  # the archive's folder is found under dataset.root
    val = build_dataset(cfg, "validation")
    assert len(val) == 2 and val.num_classes == 150 and val.class_names[:3] == ("wall", "building", "sky")
    assert build_dataset(cfg, "val").pairs == val.pairs  # 'val' names the validation folder
    label = val.read(0)[1]
    stored = ade_label().astype(np.int64)
    np.testing.assert_array_equal(label, np.where(stored == 0, 255, stored - 1))
    assert str(root) in val.pairs[0][0]


def test_ade20k_seed_convention(compose, tmp_path):
    write_ade20k(tmp_path)
    cfg = dataset_cfg(
        compose,
        "ade20k",
        tmp_path,
        "dataset.reduce_zero_label=false",
        "dataset.num_classes=151",
        "dataset.ignore_index=0",
    )
    val = build_dataset(cfg, "validation")
    assert val.num_classes == 151 and val.ignore_index == 0 and val.class_names[0] == "other"
    np.testing.assert_array_equal(val.read(1)[1], ade_label())


def test_ade20k_conflicting_settings(compose, tmp_path):
    write_ade20k(tmp_path)
    with pytest.raises(DataError, match="num_classes=150, but the ade20k data set has 151"):
        build_dataset(dataset_cfg(compose, "ade20k", tmp_path, "dataset.reduce_zero_label=false"), "validation")
    with pytest.raises(DataError, match="ignore_index=0 is a class id"):
        build_dataset(dataset_cfg(compose, "ade20k", tmp_path, "dataset.ignore_index=0"), "validation")


# ---------------------------------------------------------------------------------------------- Pascal VOC


def test_voc_palette_pngs_give_indices_not_colours(compose, tmp_path):
    root = write_voc(tmp_path / "VOCdevkit" / "VOC2012")
    assert cv2.imread(str(next((root / "SegmentationClass").iterdir())), cv2.IMREAD_UNCHANGED).ndim == 3
    cfg = dataset_cfg(compose, "voc", tmp_path)  # VOCdevkit/VOC2012 is found under dataset.root
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (2, 1) and train.meta["labels"] == "SegmentationClass"
    np.testing.assert_array_equal(train.read(0)[1], voc_label())
    assert val.color(np.array([[1, 15]]))[0].tolist() == [[128, 0, 0], [192, 128, 128]]  # aeroplane, person


def test_voc_uses_the_augmented_set_when_present(compose, tmp_path):
    root = write_voc(tmp_path, aug=True)
    cfg = dataset_cfg(compose, "voc", root)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.meta == {"split": "train_aug", "labels": "SegmentationClassAug"} and len(train) == 4
    np.testing.assert_array_equal(train.read(3)[1], np.full((H, W), 3))
    assert val.meta["labels"] == "SegmentationClass"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "name,url",
    [
        ("cityscapes", "https://www.cityscapes-dataset.com/downloads/"),
        ("ade20k", "ADEChallengeData2016.zip"),
        ("voc", "VOCtrainval_11-May-2012.tar"),
    ],
)
def test_missing_or_empty_root(compose, tmp_path, name, url):
    with pytest.raises(DataError) as err:
        build_dataset(dataset_cfg(compose, name, tmp_path / "nowhere"), "val")
    assert "does not exist" in str(err.value) and url in str(err.value) and "Expected this layout" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        build_dataset(dataset_cfg(compose, name, tmp_path / "empty"), "val")
    (tmp_path / "empty" / "something").mkdir()
    with pytest.raises(DataError, match="has no .*/ folder. Expected this layout"):
        build_dataset(dataset_cfg(compose, name, tmp_path / "empty"), "val")


def test_empty_and_unknown_splits(compose, tmp_path):
    root = write_cityscapes(tmp_path)
    (root / "leftImg8bit/train").mkdir()
    (root / "gtFine/train").mkdir()
    with pytest.raises(DataError, match="the split is empty"):
        build_dataset(dataset_cfg(compose, "cityscapes", root), "train")
    with pytest.raises(DataError, match=r"not found for split 'tset' \(splits found there: \['train', 'val'\]\)"):
        build_dataset(dataset_cfg(compose, "cityscapes", root), "tset")
    write_voc(tmp_path / "voc")
    (tmp_path / "voc/ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(DataError, match="the split 'val' is empty"):
        build_dataset(dataset_cfg(compose, "voc", tmp_path / "voc"), "val")
    with pytest.raises(DataError, match=r"lists found there: \['train', 'val'\]"):
        build_dataset(dataset_cfg(compose, "voc", tmp_path / "voc"), "trainval")


MISSING_FILE = re.compile(r"(\S+): (image|label) of '([^']+)' is missing \((listed in \S+|its (image|label) is \S+)\)")


def missing_files(message: str) -> set[tuple[str, str]]:
    """(file, sample) of every line of a DataError that reports a missing file; any other problem line fails."""
    lines = message.splitlines()[1:]
    assert lines and all(MISSING_FILE.fullmatch(line.strip()) for line in lines), message
    return {MISSING_FILE.fullmatch(line.strip()).group(1, 3) for line in lines}


def test_missing_files_are_reported_one_way_by_every_data_set(compose, tmp_path):
    """A split list (Pascal VOC, the embedded sets), or two folders matched by name (Cityscapes, ADE20K): one
    pairing function, so every missing file is one line of the same form, all of them listed, none stopping the
    search for the others."""
    from ccnet.data.files import pairs_from_list

    voc = write_voc(tmp_path / "voc")
    (voc / "JPEGImages/2007_000000.jpg").unlink()
    (voc / "SegmentationClass/2007_000001.png").unlink()
    with pytest.raises(DataError) as err:
        build_dataset(dataset_cfg(compose, "voc", voc), "train")
    assert missing_files(str(err.value)) == {
        (str(voc / "JPEGImages/2007_000000.jpg"), "2007_000000"),
        (str(voc / "SegmentationClass/2007_000001.png"), "2007_000001"),
    }
    city = write_cityscapes(tmp_path / "city", names=("a/a_0_1", "a/a_0_2", "b/b_0_3"))
    (city / "gtFine/val/a/a_0_1_gtFine_labelIds.png").unlink()
    (city / "leftImg8bit/val/b/b_0_3_leftImg8bit.png").unlink()
    with pytest.raises(DataError) as err:
        build_dataset(dataset_cfg(compose, "cityscapes", city), "val")
    assert missing_files(str(err.value)) == {
        (str(city / "gtFine/val/a/a_0_1_gtFine_labelIds.png"), "a/a_0_1"),
        (str(city / "leftImg8bit/val/b/b_0_3_leftImg8bit.png"), "b/b_0_3"),
    }
    ade = write_ade20k(tmp_path / "ade")
    (ade / "annotations/validation/ADE_val_00000001.png").unlink()
    with pytest.raises(DataError) as err:
        build_dataset(dataset_cfg(compose, "ade20k", ade), "val")
    assert missing_files(str(err.value)) == {
        (str(ade / "annotations/validation/ADE_val_00000001.png"), "ADE_val_00000001")
    }
    listed = tmp_path / "listed"
    (listed / "train.txt").parent.mkdir()
    (listed / "train.txt").write_text("0000\n0001\n0002\n")
    for name in ("0000", "0002"):
        write_pair_as(listed, "train", name)
    with pytest.raises(DataError) as err:
        pairs_from_list(listed, "train", "images", "labels", ".png", ".png")
    assert missing_files(str(err.value)) == {
        (str(listed / "images/train/0001.png"), "0001"),
        (str(listed / "labels/train/0001.png"), "0001"),
    }


def write_pair_as(root: Path, split: str, name: str) -> None:
    for folder in ("images", "labels"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / folder / split / f"{name}.png"), np.zeros((4, 4), np.uint8))


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_samples_are_each_named(compose, tmp_path):
    """Truncated PNG and JPEG, size mismatch, out-of-range label values: each read names its file."""
    cs = write_cityscapes(tmp_path / "cs", names=("a/a_0_0", "a/a_0_1", "a/a_0_2", "a/a_0_3"))
    truncate(cs / "leftImg8bit/val/a/a_0_0_leftImg8bit.png")
    cv2.imwrite(str(cs / "leftImg8bit/val/a/a_0_1_leftImg8bit.png"), random_image(0, H, W + 1))
    bad_ids = every_label_id()
    bad_ids[2, 3] = 40  # no Cityscapes label id
    cv2.imwrite(str(cs / "gtFine/val/a/a_0_2_gtFine_labelIds.png"), bad_ids)
    truncate(cs / "gtFine/val/a/a_0_3_gtFine_labelIds.png")
    val = build_dataset(dataset_cfg(compose, "cityscapes", cs), "val")
    problems = verify_dataset(val)  # every problem at once
    assert len(problems) == 4
    assert "a_0_0_leftImg8bit.png: cannot decode the image" in problems[0]
    assert "a_0_1_leftImg8bit.png: image is 9x6 but its label" in problems[1]
    assert "a_0_2_gtFine_labelIds.png: stored label values [40]" in problems[2]
    assert "a_0_3_gtFine_labelIds.png: cannot decode the label" in problems[3]

    ade = write_ade20k(tmp_path / "ade")
    truncate(ade / "images/validation/ADE_val_00000001.jpg")  # OpenCV alone would decode it without an error
    cv2.imwrite(str(ade / "annotations/validation/ADE_val_00000002.png"), np.full((H, W), 200, np.uint8))
    problems = verify_dataset(build_dataset(dataset_cfg(compose, "ade20k", ade), "validation"))
    assert "ADE_val_00000001.jpg: cannot decode the image" in problems[0]
    assert "ADE_val_00000002.png: stored label values [200]" in problems[1]

    voc = write_voc(tmp_path / "voc")
    write_palette_png(voc / "SegmentationClass/2007_000000.png", np.full((H, W), 30, np.uint8))
    (problem,) = verify_dataset(build_dataset(dataset_cfg(compose, "voc", voc), "train"))
    assert "2007_000000.png: stored label values [30]" in problem


def test_verify_lists_every_problem_of_both_splits(compose, tmp_path):
    from ccnet.jobs.train import load_splits

    root = write_cityscapes(tmp_path, split="train")
    write_cityscapes(tmp_path, split="val")
    truncate(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png")
    truncate(root / "gtFine/val/bonn/bonn_000001_000002_gtFine_labelIds.png")
    cfg = compose(["dataset=cityscapes", f"dataset.root={root}", "dataset.verify=true"])
    with pytest.raises(DataError) as err:
        load_splits(cfg)
    assert "2 problem(s)" in str(err.value)
    assert "train/aachen/aachen_000000_000019_leftImg8bit.png" in str(err.value)
    assert "val/bonn/bonn_000001_000002_gtFine_labelIds.png" in str(err.value)


def test_every_eval_preset_composes(compose):
    for preset in ("whole", "slide_769", "ms_flip"):
        cfg = compose([f"eval={preset}"]).eval
        assert cfg.mode in ("whole", "slide") and not cfg.save_submission
    assert compose(["experiment=cityscapes_r101_paper"]).eval.mode == "slide"


def test_submission_needs_a_format(tmp_path):
    from ccnet.engine.evaluate import evaluate

    dataset = SimpleNamespace(name="voc", meta={})
    with pytest.raises(DataError, match="no submission format"):
        evaluate(None, dataset, None, None, submission_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ data-set facts


def test_a_data_sets_facts_are_read_by_the_data_set_the_export_and_the_published_model_lookup(compose, tmp_path):
    """Class names and colours are declared once, at the registration: a data set registered here (as a plugin
    would) is named and coloured by the export and found by its class count, without an edit elsewhere."""
    from ccnet import export
    from ccnet.data.datasets import DatasetFacts, dataset_facts, dataset_with_classes
    from ccnet.registry import DATASETS

    assert {n: dataset_with_classes(n) for n in (19, 150, 21, 151)} == {
        19: "cityscapes",
        150: "ade20k",  # reduce_zero_label, the default
        21: "voc",
        151: None,
    }
    facts = DatasetFacts(("sky", "sea", "sand"), np.array([[0, 0, 255], [0, 128, 128], [200, 180, 90]], np.uint8))
    DATASETS.register("beach", facts=lambda section: facts)(lambda cfg, split: None)
    try:
        section = {"name": "beach", "num_classes": 3}
        assert export.class_names(section) == ["sky", "sea", "sand"]
        assert export.palette(section) == [[0, 0, 255], [0, 128, 128], [200, 180, 90]]
        assert dataset_with_classes(3) == "beach"
        assert export.class_names({**section, "num_classes": 4}) == ["0", "1", "2", "3"]  # not the data set's count
        DATASETS.register("beach_copy", facts=lambda section: facts)(lambda cfg, split: None)
        assert dataset_with_classes(3) is None  # two data sets of 3 classes: which one is not known
    finally:
        DATASETS._entries.pop("beach", None)
        DATASETS._entries.pop("beach_copy", None)
    for name, write in (("cityscapes", write_cityscapes), ("ade20k", write_ade20k), ("voc", write_voc)):
        cfg = dataset_cfg(compose, name, write(tmp_path / name))
        built, facts = build_dataset(cfg, "val"), dataset_facts(cfg)
        assert built.class_names == facts.class_names and np.array_equal(built.palette, facts.palette)
        assert export.class_names(cfg) == list(built.class_names)
        assert export.palette(cfg) == built.palette.astype(int).tolist()
    seed = {"name": "ade20k", "num_classes": 151, "reduce_zero_label": False}  # the seed's convention
    assert export.class_names(seed)[:2] == ["other", "wall"] and len(export.palette(seed)) == 151
