"""The embedded data set on disk, the shared reader's errors, and the augmentation."""

import cv2
import numpy as np
import pytest

from ccnet.data.datasets import DataError, SegmentationDataset, build_dataset, verify_dataset
from ccnet.data.loader import train_batches
from ccnet.data.synthetic import SHAPES_CLASSES, ensure_shapes_dataset
from ccnet.data.transforms import pad_and_random_crop, train_transform


def test_embedded_dataset_layout_and_content(compose, data_home):
    cfg = compose().dataset
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 320 and len(val) == 80
    root = data_home / "shapes_v1"
    assert (root / "train.txt").is_file() and (root / "images" / "train" / "0000.png").is_file()
    seen = set()
    for i in range(40):
        image, label = train.read(i)
        assert image.dtype == np.uint8 and image.shape == (160, 160, 3) and label.shape == (160, 160)
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(len(SHAPES_CLASSES))) | {255}  # every class and some ignore pixels


def test_generation_is_deterministic(tmp_path, data_home):
    again = ensure_shapes_dataset(tmp_path, splits=(("train", 3),))
    for name in ("0000", "0002"):
        a = cv2.imread(str(again / "images" / "train" / f"{name}.png"))
        b = cv2.imread(str(data_home / "shapes_v1" / "images" / "train" / f"{name}.png"))
        np.testing.assert_array_equal(a, b)


def test_colour_alone_does_not_tell_classes_apart(compose):
    """Every class appears in several fill colours: mean colours of shapes of one class vary widely."""
    train = build_dataset(compose().dataset, "train")
    colours = {c: [] for c in range(1, len(SHAPES_CLASSES))}
    for i in range(60):
        image, label = train.read(i)
        for c in colours:
            if (label == c).sum() > 50:
                colours[c].append(image[label == c].mean(0))
    for c, cs in colours.items():
        assert np.std(np.array(cs), axis=0).mean() > 20, SHAPES_CLASSES[c]


def write_pair(tmp_path, name, image, label):
    cv2.imwrite(str(tmp_path / f"{name}.png"), image)
    cv2.imwrite(str(tmp_path / f"{name}_label.png"), label)
    return str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_label.png")


def test_bad_samples_give_errors_naming_the_file(tmp_path):
    good = write_pair(tmp_path, "good", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    size = write_pair(tmp_path, "size", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))
    values = write_pair(tmp_path, "values", np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 9, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    broken = (str(tmp_path / "broken.png"), good[1])
    missing = (str(tmp_path / "nope.png"), good[1])
    ds = SegmentationDataset("t", [good, size, values, broken, missing], ("a", "b", "c"))
    ds.read(0)
    for index, words in [
        (1, ["size.png", "8x8", "9x8"]),
        (2, ["values_label.png", "[9]", "0..2"]),
        (3, ["broken.png", "cannot decode"]),
        (4, ["nope.png", "not found"]),
    ]:
        with pytest.raises(DataError) as err:
            ds.read(index)
        assert all(w in str(err.value) for w in words), str(err.value)
    assert len(verify_dataset(ds)) == 4


def test_missing_split_list_and_empty_split(tmp_path):
    from ccnet.data.files import pairs_from_list

    with pytest.raises(DataError, match="train.txt"):
        pairs_from_list(tmp_path, "train", "images", "labels", ".png", ".png")
    (tmp_path / "train.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        pairs_from_list(tmp_path, "train", "images", "labels", ".png", ".png")


def test_crop_pads_the_label_with_ignore():
    rng = np.random.default_rng(0)
    image, label = np.ones((5, 6, 3), np.float32), np.zeros((5, 6), np.int64)
    out_image, out_label = pad_and_random_crop(image, label, rng, (8, 8), 255)
    assert out_image.shape == (8, 8, 3) and out_label.shape == (8, 8)
    assert (out_label == 255).sum() == 64 - 30 and (out_image.sum(-1) == 0).sum() == 64 - 30


def test_train_batches_are_reproducible_and_resume_mid_stream(compose):
    cfg = compose(["schedule.crop_size=[32,32]"])
    ds = build_dataset(cfg.dataset, "train")

    def transform(im, lb, rng):
        return train_transform(im, lb, rng, cfg.dataset, cfg.schedule)

    first = train_batches(ds, transform, 4, seed=1)
    straight = [next(first) for _ in range(5)]
    first.close()
    resumed = train_batches(ds, transform, 4, seed=1, start_iter=3)
    for expected in straight[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    resumed.close()
    assert straight[0][0].shape == (4, 3, 32, 32) and straight[0][1].shape == (4, 32, 32)
