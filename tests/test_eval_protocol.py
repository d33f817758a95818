"""The evaluation protocols of the published models: test-time resize (mmcv's keep-ratio rule), logits back to the
label size with either align_corners, softmax vs logit averaging, windows with and without padding; without a test
resize, our protocol exactly as before; the evaluation's threaded preparation gives what predict_image gives."""

from __future__ import annotations

import cv2
import jittor as jt
import numpy as np
import pytest
from omegaconf import OmegaConf
from test_export import randomise
from test_models import bilinear_align_corners_reference, bilinear_half_pixel_reference

from ccnet.data.transforms import eval_transform
from ccnet.engine.inference import predict, predict_image, rescale_size, resize_chw, resize_logits, scaled_sizes


class Recorder:
    """A model whose logits are a fixed function of its input; it records the input sizes it saw."""

    def __init__(self, fn, align_corners=False):
        self.fn, self.align_corners, self.sizes = fn, align_corners, []

    def __call__(self, x):
        self.sizes.append(tuple(x.shape[2:]))
        return jt.array(np.ascontiguousarray(self.fn(x.numpy()), np.float32))


def eval_cfg(**kw):
    base = dict(mode="whole", crop_size=[769, 769], stride=[513, 513], scales=[1.0], flip=False)
    return OmegaConf.create({**base, **kw})


PLAIN = OmegaConf.create(dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], bgr=False))


@pytest.mark.parametrize(
    "hw, bound, expected",
    [
        ((1024, 2048), (2048, 1024), (1024, 2048)),  # mmseg Cityscapes 512x1024 configs: unchanged
        ((1024, 2048), (2049, 1025), (1025, 2049)),  # the 769x769 configs: factor 2049/2048, sides int(x + 0.5)
        ((375, 500), (2048, 512), (512, 683)),  # a VOC image: short side to 512 (683.17 -> 683)
        ((512, 683), (2048, 512), (512, 683)),  # ADE20K: already at the bound
        ((300, 2400), (2048, 512), (256, 2048)),  # a panorama: the long side limits
        ((1024, 2048), (1024, 512), (512, 1024)),  # ratio 0.5 of (2048, 1024)
    ],
)
def test_rescale_size_is_mmcvs_keep_ratio_rule(hw, bound, expected):
    assert rescale_size(*hw, bound) == expected


def test_multi_scale_sizes_rescale_the_original_to_ratio_times_the_bound():
    """mmseg MultiScaleFlipAug: img_scale (2049, 1025) x ratio, as ints, then keep-ratio on the 1024x2048 image."""
    ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    got = scaled_sizes(1024, 2048, ratios, (2049, 1025))
    # by hand: bound (int(2049 r), int(1025 r)); factor = min(that / (2048, 1024)); sides int(side * factor + .5)
    expected = []
    for r in ratios:
        long, short = int(2049 * r), int(1025 * r)
        f = min(long / 2048, short / 1024)
        expected.append((int(1024 * f + 0.5), int(2048 * f + 0.5)))
    assert got == expected and got[0] == (512, 1024) and got[2] == (1025, 2049)
    assert scaled_sizes(40, 60, [0.5, 1.75]) == [(20, 30), (70, 105)]  # no bound: ratio x the image


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape, size", [((3, 9, 8), (67, 61)), ((2, 25, 33), (24, 32)), ((2, 5, 7), (5, 7))])
def test_resize_logits_against_float64(align_corners, shape, size):
    x = np.random.default_rng(0).standard_normal(shape)
    ref = (bilinear_align_corners_reference if align_corners else bilinear_half_pixel_reference)(x[None], size)[0]
    np.testing.assert_allclose(resize_logits(x.astype(np.float32), size, align_corners), ref, rtol=0, atol=1e-5)


def test_predict_image_resizes_then_brings_logits_back_to_the_label_size():
    """1024x2048 image, bound (2049, 1025): the model sees 1025x2049; its logits come back to 1024x2048 with its
    align_corners (a ramp shows which)."""
    image = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    ramp = lambda v: np.broadcast_to(np.arange(v.shape[3], dtype=np.float32), (1, 1) + v.shape[2:])  # noqa: E731
    for align_corners in (True, False):
        model = Recorder(ramp, align_corners)
        out = predict_image(model, image, PLAIN, eval_cfg(resize=[129, 65]))
        assert model.sizes == [(65, 129)] and out.shape == (1, 64, 128)
        ref = (bilinear_align_corners_reference if align_corners else bilinear_half_pixel_reference)(
            np.arange(129, dtype=np.float64)[None, None, None].repeat(65, 2), (64, 128)
        )[0]
        np.testing.assert_allclose(out, ref, atol=1e-4)
    # the pixels the model sees: the uint8 image resized by OpenCV (bilinear, as mmcv), then normalised
    seen = []
    predict_image(Recorder(lambda v: seen.append(v) or v[:, :1]), image, PLAIN, eval_cfg(resize=[129, 65]))
    expected = cv2.resize(image, (129, 65), interpolation=cv2.INTER_LINEAR).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(seen[0][0], expected)


def test_probabilities_or_logits_are_averaged():
    """Two views (an image and its mirror) of a model that is not flip-equivariant: mmseg averages softmax
    probabilities, the authors logits; the two rules give different maps."""
    x = np.random.default_rng(2).standard_normal((3, 6, 10)).astype(np.float32)
    col = np.linspace(-3, 3, 10, dtype=np.float32)
    fn = lambda v: np.stack([v[0, 0] * col, -v[0, 1] * col**2, v[0, 2]])[None]  # noqa: E731
    model = Recorder(fn)
    a, b = fn(x[None])[0], fn(x[None, :, :, ::-1].copy())[0][:, :, ::-1]
    soft = lambda z: np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)  # noqa: E731
    np.testing.assert_allclose(predict(model, x, flip=True), (a + b) / 2, atol=1e-5)
    np.testing.assert_allclose(predict(model, x, flip=True, average="probs"), (soft(a) + soft(b)) / 2, atol=1e-6)
    assert (soft(a) + soft(b)).argmax(0).tolist() != (a + b).argmax(0).tolist()  # the choice matters here
    with pytest.raises(ValueError, match="eval.average='mean'"):
        predict(model, x, average="mean")


def test_windows_smaller_than_the_image_are_padded_or_cut():
    """A 20x30 image, 24x24 tiles: the authors pad every window to 24x24 (zeros beyond the image); mmseg runs a
    20x24 window (its slide_inference never pads)."""
    x = np.random.default_rng(3).standard_normal((3, 20, 30)).astype(np.float32)
    padded, cut = Recorder(lambda v: v[:, :1]), Recorder(lambda v: v[:, :1])
    out_p = predict(padded, x, "slide", (24, 24), (16, 16))
    out_c = predict(cut, x, "slide", (24, 24), (16, 16), pad_windows=False)
    assert set(padded.sizes) == {(24, 24)} and set(cut.sizes) == {(20, 24)}
    np.testing.assert_allclose(out_p[0], x[0], atol=1e-6)
    np.testing.assert_allclose(out_c[0], x[0], atol=1e-6)


@pytest.mark.parametrize(
    "hw, rows, cols",
    [
        # Cityscapes 1024 x 2048, by hand: stride ceil(512 * 2 / 3) = 342; rows ceil((1024 - 512) / 342) + 1 = 3 at
        # 0, 342 and 1024 - 512 = 512 (684 would overrun); columns ceil(1536 / 342) + 1 = 6 at 0, 342, 684, 1026,
        # 1368 and 2048 - 512 = 1536 (1710 would overrun): 18 windows
        ((1024, 2048), [0, 342, 512], [0, 342, 684, 1026, 1368, 1536]),
        ((512, 683), [0], [0, 171]),  # an ADE20K image: the second window flush right at 683 - 512
        ((300, 700), [0], [0, 188]),  # shorter than a window: zero-padded below to 512 rows
    ],
)
def test_the_seeds_windows_by_hand(compose, hw, rows, cols):
    """eval=seed_512: the window origins of the seed's predict_sliding, each window 512 x 512 (padded with 0)."""
    cfg = compose(["eval=seed_512"]).eval
    assert (cfg.mode, list(cfg.crop_size), list(cfg.stride), cfg.pad_windows) == ("slide", [512, 512], [342, 342], True)
    assert (list(cfg.scales), cfg.flip, cfg.max_images, list(cfg.miou_exclude), cfg.absent_iou) == (
        [1.0],
        False,
        500,
        [0],
        "zero",
    )
    h, w = hw
    where = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).astype(np.float32) + 1  # 0: padding
    image = np.concatenate([where, np.ones((1, h, w), np.float32)])
    origins, model = [], Recorder(lambda v: v[:, 2:3])
    model.fn = lambda v: (origins.append((int(v[0, 0, 0, 0]) - 1, int(v[0, 1, 0, 0]) - 1)), v[:, 2:3])[1]
    out = predict(model, image, cfg.mode, tuple(cfg.crop_size), tuple(cfg.stride), pad_windows=cfg.pad_windows)
    assert origins == [(y, x) for y in rows for x in cols]
    assert set(model.sizes) == {(512, 512)}
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)  # overlaps averaged; the zero padding is cut off


def test_without_a_test_resize_our_protocol_is_unchanged():
    """No eval.resize (ours, the authors'): the image is normalised once, other scales resize the normalised image
    and their logits come back with OpenCV's bilinear resize, logits averaged: bit for bit what predict() does on
    the normalised image (tests/test_inference.py), whatever align_corners the model has."""
    image = np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    norm = OmegaConf.create(dict(mean=[120.0, 110.0, 100.0], std=[50.0, 60.0, 70.0], bgr=True))
    fn = lambda v: np.stack([v[0, 0] * v[0, 1], np.tanh(v[0, 2])])[None]  # noqa: E731  (not flip-equivariant)
    cfg = eval_cfg(scales=[0.75, 1.0, 1.25], flip=True)
    ours = predict_image(Recorder(fn, align_corners=False), image, norm, cfg)
    x = eval_transform(image, norm)
    np.testing.assert_array_equal(ours, predict(Recorder(fn), x, scales=[0.75, 1.0, 1.25], flip=True))
    # the rule written out for one scale: the normalised image resized, its logits resized back by OpenCV
    model = Recorder(fn)
    small = predict_image(model, image, norm, eval_cfg(scales=[0.75]))
    assert model.sizes == [(28, 40)]
    expected = resize_chw(np.ascontiguousarray(fn(resize_chw(x, (28, 40))[None])[0]), (37, 53))
    np.testing.assert_allclose(small, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("protocol", [{}, {"resize": [60, 40], "average": "probs", "scales": [0.5, 1.0]}])
def test_evaluation_in_threads_gives_what_predict_image_gives(compose, protocol):
    """evaluate() prepares each image's views in the loader's threads and runs the model in the main thread: its
    confusion matrix is the one predict_image gives image by image (our protocol and mmseg's)."""
    from ccnet.data.datasets import build_dataset
    from ccnet.engine.evaluate import evaluate
    from ccnet.engine.metrics import confusion_matrix, segmentation_metrics
    from ccnet.models import build_model

    cfg = compose(["backbone.head_channels=8", "eval.max_images=3", "eval.num_vis=0", "dataset.num_workers=2"])
    for key, value in protocol.items():
        cfg.eval[key] = value
    model = build_model(cfg)
    randomise(model)  # random weights and BN statistics: predictions that vary over the image
    model.eval()
    dataset = build_dataset(cfg.dataset, cfg.dataset.val_split)
    metrics, _ = evaluate(model, dataset, cfg.dataset, cfg.eval)
    conf, seen = np.zeros((dataset.num_classes, dataset.num_classes), np.int64), set()
    for i in range(3):
        image, label = dataset.read(i)
        pred = predict_image(model, image, cfg.dataset, cfg.eval).argmax(0)
        conf += confusion_matrix(pred, label, dataset.num_classes, dataset.ignore_index)
        seen |= set(np.unique(pred).tolist())
    expected = segmentation_metrics(conf, dataset.class_names)
    assert metrics["images"] == 3 and {k: metrics[k] for k in expected} == expected
    assert len(seen) > 1  # the untrained model's predictions vary: a comparison of maps, not of constants


def test_evaluation_reports_the_seeds_miou_and_the_standard_one(compose, caplog):
    """eval.miou_exclude / eval.absent_iou reach evaluate(): mIoU by that convention (named), mIoU_standard beside
    it, both in the log's table; the numbers are segmentation_metrics' on the same confusion matrix."""
    import logging

    from ccnet.data.datasets import build_dataset
    from ccnet.engine.evaluate import evaluate
    from ccnet.engine.metrics import confusion_matrix, segmentation_metrics
    from ccnet.models import build_model

    overrides = ["backbone.head_channels=8", "eval.max_images=2", "eval.num_vis=0", "dataset.num_workers=1"]
    cfg = compose([*overrides, "eval.miou_exclude=[0]", "eval.absent_iou=zero"])
    model = build_model(cfg)
    randomise(model)
    model.eval()
    dataset = build_dataset(cfg.dataset, cfg.dataset.val_split)
    with caplog.at_level(logging.INFO):
        metrics, _ = evaluate(model, dataset, cfg.dataset, cfg.eval)
    conf = np.zeros((dataset.num_classes, dataset.num_classes), np.int64)
    for i in range(2):
        image, label = dataset.read(i)
        pred = predict_image(model, image, cfg.dataset, cfg.eval).argmax(0)
        conf += confusion_matrix(pred, label, dataset.num_classes, dataset.ignore_index)
    seed = segmentation_metrics(conf, dataset.class_names, [0], "zero")
    standard = segmentation_metrics(conf, dataset.class_names)
    assert metrics["mIoU"] == seed["mIoU"] and metrics["mIoU_standard"] == standard["mIoU"]
    assert metrics["mIoU"] != metrics["mIoU_standard"]
    assert "classes 0 (background) left out of the mean; absent classes counted as 0" in caplog.text
    assert "mIoU (standard)" in caplog.text
