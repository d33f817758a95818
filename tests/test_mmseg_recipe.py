"""mmsegmentation 0.x's training recipe: its pipeline (ccnet/data/transforms.py, schedule.resize_bound /
cat_max_ratio / photometric), each step against numbers worked out by hand or a NumPy float64 reference written here
from mmseg's description, and ours, with the new keys at their defaults, bit for bit as it was before they existed;
the poly schedule with its floor (schedule.min_lr)."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ccnet.data.datasets import build_dataset
from ccnet.data.transforms import (
    crop_is_mixed,
    pad_and_random_crop,
    photometric_distortion,
    random_resize_to_bound,
    train_transform,
)

# ------------------------------------------------------------------------------------------- keep-ratio resize

# (h, w), bound (long, short), ratio -> (h, w), by mmcv's rule: target = (int(long * r), int(short * r)),
# f = min(target long / max(h, w), target short / min(h, w)), side -> int(side * f + 0.5)
RESIZES = [
    # Cityscapes, 512x1024 configs: target (1024, 512), f = min(1024/2048, 512/1024) = 0.5
    ((1024, 2048), (2048, 1024), 0.5, (512, 1024)),
    # Cityscapes, 769x769 configs: target (1536, 768), f = 0.75
    ((1024, 2048), (2049, 1025), 0.75, (768, 1536)),
    # ... at ratio 1: f = min(2049/2048, 1025/1024) = 2049/2048; 1024 * 2049/2048 = 1024.5 -> int(1025.0) = 1025
    ((1024, 2048), (2049, 1025), 1.0, (1025, 2049)),
    # VOC 375x500: f = min(2048/500, 512/375) = 512/375; 500 * 512/375 = 682.67 -> int(683.17) = 683
    ((375, 500), (2048, 512), 1.0, (512, 683)),
    # ADE 512x683 at ratio 2: target (4096, 1024), f = min(4096/683, 1024/512) = 2
    ((512, 683), (2048, 512), 2.0, (1024, 1366)),
    # a panorama 300x2000: the long side binds, f = min(2048/2000, 512/300) = 1.024; 300 * 1.024 = 307.2 -> 307
    ((300, 2000), (2048, 512), 1.0, (307, 2048)),
    # a portrait 2000x300 (long side vertical): the same factor
    ((2000, 300), (2048, 512), 1.0, (2048, 307)),
]


@pytest.mark.parametrize("hw,bound,ratio,expected", RESIZES)
def test_keep_ratio_resize_to_ratio_times_the_bound(hw, bound, ratio, expected):
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    label = np.random.default_rng(2).integers(0, 19, hw).astype(np.int64)
    out_image, out_label = random_resize_to_bound(image, label, rng, bound, (ratio, ratio))  # r drawn = ratio
    assert out_image.shape == (*expected, 3) and out_label.shape == expected
    size = (expected[1], expected[0])
    np.testing.assert_array_equal(out_image, cv2.resize(image, size, interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out_label, cv2.resize(label.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST))
    assert out_label.dtype == np.int64


def test_the_ratio_is_drawn_uniformly_from_the_range():
    """One uniform draw r in [0.5, 2.0) per sample (mmseg: random_sample() * (max - min) + min)."""
    image, label = np.zeros((100, 200, 3), np.uint8), np.zeros((100, 200), np.int64)
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        r = twin.uniform(0.5, 2.0)
        long, short = int(2048 * r), int(512 * r)
        f = min(long / 200, short / 100)
        assert random_resize_to_bound(image, label, rng, (2048, 512), (0.5, 2.0))[1].shape == (
            int(100 * f + 0.5),
            int(200 * f + 0.5),
        )


# ------------------------------------------------------------------------------------------- cat_max_ratio crop


def test_crop_is_mixed_counts_classes_without_ignore():
    label = np.full((10, 10), 255, np.int64)
    label.flat[:14] = 1
    label.flat[14:20] = 2
    assert crop_is_mixed(label, 255, 0.75)  # 14 / 20 = 0.70 < 0.75 (with the 80 ignore pixels: 80 / 100)
    label.flat[14] = 1
    assert not crop_is_mixed(label, 255, 0.75)  # 15 / 20 = 0.75, not below
    assert not crop_is_mixed(np.where(label == 2, 1, label), 255, 0.75)  # one class (and ignore)
    assert not crop_is_mixed(np.full((4, 4), 255), 255, 0.75)  # nothing counted
    label.flat[14] = 2
    assert crop_is_mixed(np.where(label == 255, 0, label), 0, 0.75)  # the data set's ignore label (0: the seed's ADE)


def stripes():
    """100 x 100: columns 0-89 class 1, 90-99 class 2; a 20 x 20 crop at column x holds c = x - 70 columns of class 2
    (x >= 71); it passes at 0.75 when 6 <= c <= 14, i.e. x in 76..80: 5 of the 81 offsets."""
    label = np.ones((100, 100), np.int64)
    label[:, 90:] = 2
    image = np.arange(100 * 100 * 3, dtype=np.float32).reshape(100, 100, 3)  # every pixel tells where it came from
    return image, label


def offsets(seed, n, shape=(100, 100), crop=(20, 20)):
    """The first n crop corners a generator of this seed draws: y then x, each uniform in [0, side - crop]."""
    twin = np.random.default_rng(seed)
    return [
        (int(twin.integers(0, shape[0] - crop[0] + 1)), int(twin.integers(0, shape[1] - crop[1] + 1))) for _ in range(n)
    ]


def test_cat_max_ratio_keeps_the_first_crop_that_passes():
    image, label = stripes()
    found = 0
    for seed in range(60):
        candidates = offsets(seed, 11)
        passing = [(y, x) for y, x in candidates[:10] if 76 <= x <= 80]
        out_image, out_label = pad_and_random_crop(image, label, np.random.default_rng(seed), (20, 20), 255, None, 0.75)
        y, x = passing[0] if passing else candidates[10]
        np.testing.assert_array_equal(out_image, image[y : y + 20, x : x + 20])
        if passing:
            found += 1
            counts = np.bincount(out_label.ravel())
            assert counts[2] > 0 and counts.max() / counts.sum() < 0.75
    # 1 - (76/81)^10 = 47% of the seeds find one in 10 tries (one try, cat_max_ratio=1: 6%)
    assert 15 <= found <= 45, found


def test_cat_max_ratio_falls_back_to_an_eleventh_crop_unchecked():
    """No crop can pass (one class): ten are checked and refused, then one more is drawn and kept (mmseg's loop)."""
    image, _ = stripes()
    label = np.ones((100, 100), np.int64)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        out_image, out_label = pad_and_random_crop(image, label, rng, (20, 20), 255, None, 0.75)
        y, x = offsets(seed, 11)[10]
        np.testing.assert_array_equal(out_image, image[y : y + 20, x : x + 20])
        twin = np.random.default_rng(seed)
        twin.integers(0, 81, 22)  # 11 corners drawn, nothing more
        assert rng.integers(0, 2**31) == twin.integers(0, 2**31)


def test_cat_max_ratio_one_draws_a_single_crop():
    image, label = stripes()
    rng = np.random.default_rng(3)
    out_image, _ = pad_and_random_crop(image, label, rng, (20, 20), 255, None, 1.0)
    y, x = offsets(3, 1)[0]
    np.testing.assert_array_equal(out_image, image[y : y + 20, x : x + 20])


def test_a_crop_larger_than_the_image_is_checked_unpadded_then_padded():
    """A 30 x 30 crop of a 20 x 20 label: the whole label is checked (10 tries of the same window), then padded
    with 0 (image, after normalisation) and 255 (label), as mmseg's RandomCrop then Pad."""
    label = np.zeros((20, 20), np.int64)
    label[:, 12:] = 3
    image = np.full((20, 20, 3), 7, np.uint8)
    rng = np.random.default_rng(0)
    out_image, out_label = pad_and_random_crop(image, label, rng, (30, 30), 255, lambda c: c - 7.0, 0.75)
    assert (out_label[:20, :20] == label).all() and (out_label[20:] == 255).all() and (out_label[:, 20:] == 255).all()
    assert (out_image == 0).all() and out_image.shape == (30, 30, 3)


# ------------------------------------------------------------------------------------------- photometric


class Scripted:
    """A generator whose draws are given: each call must be the expected one (method, arguments) in order."""

    def __init__(self, script):
        self.script = list(script)

    def _next(self, method, args):
        expected_method, expected_args, value = self.script.pop(0)
        assert (method, args) == (expected_method, expected_args), (method, args, expected_method, expected_args)
        return value

    def integers(self, *args):
        return self._next("integers", args)

    def uniform(self, *args):
        return self._next("uniform", args)


def coin(value):
    return ("integers", (2,), value)


def ref_convert(x, alpha=1.0, beta=0.0):
    """x * alpha + beta, clipped to [0, 255], truncated to an integer (mmseg's convert ends in uint8). The
    multiply-add is float32's, as mmseg's (img.astype(np.float32) * alpha + beta): its truncation depends on it,
    10 x 1.3 is 12.9999995 in float32 (12 once truncated), 13.000000000000002 in float64."""
    return np.floor(np.clip(np.asarray(x, np.float32) * np.float32(alpha) + np.float32(beta), 0, 255)).astype(
        np.float64
    )


def ref_rgb_to_hsv(rgb):
    """OpenCV's 8-bit HSV from RGB, in float64: V = max, S = 255 (V - min) / V, H = hue in degrees / 2 (0..180),
    each rounded to the nearest integer."""
    rgb = np.asarray(rgb, np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, low = rgb.max(-1), rgb.min(-1)
    diff = v - low
    s = np.where(v > 0, 255 * diff / np.maximum(v, 1), 0)
    d = np.maximum(diff, 1e-12)
    h = np.where(v == r, 60 * (g - b) / d, np.where(v == g, 120 + 60 * (b - r) / d, 240 + 60 * (r - g) / d))
    h = np.where(diff == 0, 0, np.where(h < 0, h + 360, h))
    hsv = np.floor(np.stack([h / 2, s, v], -1) + 0.5)
    hsv[..., 0] %= 180  # 359.5 degrees and up round to 0, not 180
    return hsv


def ref_hsv_to_rgb(hsv):
    """RGB (0..255, rounded) from OpenCV's 8-bit HSV: hue 2 H degrees, saturation S / 255, value V / 255."""
    h = (hsv[..., 0] * 2 % 360) / 60
    s, v = hsv[..., 1] / 255, hsv[..., 2] / 255
    sector = np.floor(h)
    f = h - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, channels in enumerate(table):
        out[sector == k] = np.stack(channels, -1)[sector == k]
    return np.floor(out * 255 + 0.5)


def reference(image, brightness=None, contrast=None, contrast_first=False, saturation=None, hue=None):
    """mmseg's PhotoMetricDistortion with its decisions given (None: the step is skipped), in float64."""
    x = np.asarray(image, np.float64)
    if brightness is not None:
        x = ref_convert(x, beta=brightness)
    if contrast_first and contrast is not None:
        x = ref_convert(x, alpha=contrast)
    if saturation is not None:
        hsv = ref_rgb_to_hsv(x)
        hsv[..., 1] = ref_convert(hsv[..., 1], alpha=saturation)
        x = ref_hsv_to_rgb(hsv)
    if hue is not None:
        hsv = ref_rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + hue) % 180
        x = ref_hsv_to_rgb(hsv)
    if not contrast_first and contrast is not None:
        x = ref_convert(x, alpha=contrast)
    return x


def script(brightness=None, contrast=None, contrast_first=False, saturation=None, hue=None):
    """The draws mmseg makes for these decisions, in its order: brightness coin (+ delta), the contrast-position
    coin, [contrast coin (+ alpha)], saturation coin (+ alpha), hue coin (+ delta), [contrast coin (+ alpha)]."""
    steps = [coin(brightness is not None)] + ([("uniform", (-32, 32), brightness)] if brightness is not None else [])
    contrast_steps = [coin(contrast is not None)] + (
        [("uniform", (0.5, 1.5), contrast)] if contrast is not None else []
    )
    steps.append(coin(1 if contrast_first else 0))
    if contrast_first:
        steps += contrast_steps
    steps += [coin(saturation is not None)] + ([("uniform", (0.5, 1.5), saturation)] if saturation is not None else [])
    steps += [coin(hue is not None)] + ([("integers", (-18, 18), hue)] if hue is not None else [])
    if not contrast_first:
        steps += contrast_steps
    return steps


def sample_image():
    """64 x 64 random colours, and black, white, grey, pure and near-pure colours in the first row."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image[0, :8] = [
        [0, 0, 0],
        [255, 255, 255],
        [128, 128, 128],
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [250, 5, 3],
        [3, 5, 250],
    ]
    return image


DECISIONS = [
    {},  # every coin says no: the image as it is
    {"brightness": 20.7},
    {"brightness": -31.5},
    {"contrast": 1.3},
    {"contrast": 0.55, "contrast_first": True},
    {"saturation": 0.6},
    {"saturation": 1.4},
    {"hue": 17},
    {"hue": -18},  # red (H 0) wraps to H 162
    {"brightness": 20.7, "contrast": 1.3, "contrast_first": True, "saturation": 0.6, "hue": 17},
    {"brightness": -31.5, "contrast": 0.55, "contrast_first": False, "saturation": 1.4, "hue": -18},
]


@pytest.mark.parametrize("decisions", DECISIONS, ids=[",".join(d) or "none" for d in DECISIONS])
def test_photometric_distortion_matches_the_float64_reference(decisions):
    image = sample_image()
    rng = Scripted(script(**decisions))
    out = photometric_distortion(image.copy(), rng)
    assert not rng.script, "draws left over"
    assert out.dtype == np.uint8 and out.shape == image.shape
    expected = reference(image, **decisions)
    diff = np.abs(out.astype(np.float64) - expected)
    if "saturation" in decisions or "hue" in decisions:
        # The HSV round trips are OpenCV's 8-bit ones (mmcv calls cv2.cvtColor too): fixed-point tables, and its SIMD
        # HSV -> RGB differs from its own scalar code by one level in ~30% of values (OpenCV 4.11); a hue one unit
        # off moves a saturated colour by several levels. So: within rounding on the whole, mean |diff| < 1 and 99%
        # within 2 levels (measured: means 0.19-0.63); a wrong meaning (hue turned the other way, RGB taken for
        # BGR, another HSV channel scaled) gives means of 3 to 77 here.
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 2, (diff.mean(), np.percentile(diff, 99))
    else:
        assert diff.max() == 0


def test_photometric_on_rgb_equals_mmsegs_on_bgr():
    """mmseg converts its BGR image with COLOR_BGR2HSV; ours is RGB and converts with COLOR_RGB2HSV: the same
    output, channel for channel, for the same draws (written here as mmseg does it, on the BGR image)."""
    image = sample_image()
    decisions = {"brightness": 9.25, "contrast": 1.45, "saturation": 0.7, "hue": 11}

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    bgr = convert(image[:, :, ::-1], beta=9.25)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=0.7)
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + 11) % 180
    bgr = convert(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), alpha=1.45)
    out = photometric_distortion(image.copy(), Scripted(script(**decisions)))
    np.testing.assert_array_equal(out, bgr[:, :, ::-1])


def test_photometric_draws_vary_and_stay_in_range():
    """With a real generator: outputs uint8, different from the input for most seeds, never all steps skipped."""
    image = sample_image()
    changed = sum(not np.array_equal(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(32))
    assert 24 <= changed <= 32  # every step skipped: (1/2)^4 of the seeds


# ------------------------------------------------------------------------------------------- the whole pipeline


def legacy_train_transform(image, label, rng, d, s):
    """train_transform as it was before mmseg's steps existed (commit b069300), written out: the default run's
    pipeline must stay this, draw for draw."""
    low, high = s.scale_range
    scale = rng.choice(np.arange(low, high + 1e-9, s.scale_step)) if s.scale_step > 0 else rng.uniform(low, high)
    h, w = label.shape
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(
        label.astype(np.uint8) if label.max() < 256 else label.astype(np.float32), size, interpolation=cv2.INTER_NEAREST
    ).astype(np.int64)
    if s.mirror and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    ch, cw = s.crop_size
    h, w = label.shape
    y, x = rng.integers(0, max(h - ch, 0) + 1), rng.integers(0, max(w - cw, 0) + 1)
    image, label = image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]
    image = image.astype(np.float32)
    if d.bgr:
        image = image[:, :, ::-1]
    image = (image - np.asarray(d.mean, np.float32)) / np.asarray(d.std, np.float32)
    ph, pw = ch - label.shape[0], cw - label.shape[1]
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=d.ignore_index)
    return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["schedule=paper", "schedule.crop_size=[200,150]"],
        ["normalization=authors_bgr", "schedule.scale_step=0.25"],
        ["schedule.crop_size=[8,8]"],  # many crops of one class: a crop check left on would draw again
    ],
    ids=["default", "paper-padded", "bgr-grid", "small-crop"],
)
def test_default_pipeline_is_unchanged_bit_for_bit(compose, overrides):
    cfg = compose(overrides)
    s = cfg.schedule
    assert (s.resize_bound, s.cat_max_ratio, s.photometric, s.min_lr) == (None, 1.0, False, 0.0)
    train = build_dataset(cfg.dataset, "train")
    for index in range(6):
        image, label = train.read(index)
        for seed in range(3):
            rng, twin = np.random.default_rng([seed, index]), np.random.default_rng([seed, index])
            got = train_transform(image, label, rng, cfg.dataset, s)
            expected = legacy_train_transform(image, label, twin, cfg.dataset, s)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
            assert rng.integers(0, 2**31) == twin.integers(0, 2**31)  # the same draws, no more


def test_mmseg_pipeline_end_to_end_on_one_sample():
    """resize to the bound, mirror, cat_max_ratio crop, photometric, normalise, pad: shapes, padding values, and
    the draws in that order (a twin generator repeats them step by step)."""
    from ccnet.data.transforms import photometric_distortion as photometric

    d = SimpleNamespace(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr=False, ignore_index=255)
    s = SimpleNamespace(
        scale_range=[0.5, 2.0],
        scale_step=0.0,
        mirror=True,
        crop_size=[64, 96],
        resize_bound=[128, 48],
        cat_max_ratio=0.75,
        photometric=True,
    )
    image = np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    label = np.zeros((40, 100), np.int64)
    label[:, 50:] = 1
    label[:3] = 255
    for seed in range(8):
        out_image, out_label = train_transform(image, label, np.random.default_rng(seed), d, s)
        twin = np.random.default_rng(seed)
        r = twin.uniform(0.5, 2.0)
        long, short = int(128 * r), int(48 * r)
        f = min(long / 100, short / 40)
        h, w = int(40 * f + 0.5), int(100 * f + 0.5)
        im = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        lb = cv2.resize(label.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
        if twin.random() < 0.5:
            im, lb = im[:, ::-1], lb[:, ::-1]
        for _ in range(11):
            y, x = twin.integers(0, max(h - 64, 0) + 1), twin.integers(0, max(w - 96, 0) + 1)
            if crop_is_mixed(lb[y : y + 64, x : x + 96], 255, 0.75):
                break
        crop = photometric(np.ascontiguousarray(im[y : y + 64, x : x + 96]), twin)
        ch, cw = crop.shape[:2]
        expected = (crop.astype(np.float32) - np.float32(d.mean)) / np.float32(d.std)
        assert out_image.shape == (3, 64, 96) and out_label.shape == (64, 96)
        np.testing.assert_array_equal(out_image[:, :ch, :cw], expected.transpose(2, 0, 1))
        np.testing.assert_array_equal(out_label[:ch, :cw], lb[y : y + 64, x : x + 96])
        assert (out_image[:, ch:] == 0).all() and (out_image[:, :, cw:] == 0).all()
        assert (out_label[ch:] == 255).all() and (out_label[:, cw:] == 255).all()


# ------------------------------------------------------------------------------------------- poly schedule


def test_poly_lr_with_mmsegs_floor():
    """mmcv's PolyLrUpdaterHook: (lr - min_lr) * (1 - it / iters) ** 0.9 + min_lr at the 0-based iteration, with
    mmseg's lr 0.01, min_lr 1e-4 over 80k iterations; numbers worked out by hand."""
    from ccnet.engine.trainer import poly_lr

    assert poly_lr(0.01, 0, 80000, 0.9, 1e-4) == pytest.approx(0.01, rel=1e-12)  # (0.01 - 1e-4) * 1 + 1e-4
    # the middle: 0.5 ** 0.9 = 0.535886731268...; 0.0099 * 0.535886731268 + 1e-4 = 0.005405278639...
    assert poly_lr(0.01, 40000, 80000, 0.9, 1e-4) == pytest.approx(0.005405278639, rel=1e-9)
    # the last step: (1 / 80000) ** 0.9 = 3.8656187e-5; 0.0099 * 3.8656187e-5 + 1e-4 = 1.00382696e-4
    assert poly_lr(0.01, 79999, 80000, 0.9, 1e-4) == pytest.approx(1.00382696e-4, rel=1e-7)
    assert poly_lr(0.01, 80000, 80000, 0.9, 1e-4) == pytest.approx(1e-4, rel=1e-12)  # the floor, never below


def test_poly_lr_without_a_floor_is_ours_bit_for_bit():
    from ccnet.engine.trainer import poly_lr

    for base, iters, power in [(0.02, 3000, 0.9), (0.01, 60000, 0.9), (0.05, 1500, 1.0)]:
        for it in list(range(0, iters, max(1, iters // 97))) + [iters - 1]:
            assert poly_lr(base, it, iters, power) == base * (1 - it / iters) ** power  # the formula as it was
            assert poly_lr(base, it, iters, power, 0.0) == base * (1 - it / iters) ** power
