"""Inference modes against whole-image inference on stub models with known outputs; metrics and the Cityscapes
submission through evaluate(); the clear missing-data error of run.py."""

import subprocess
import sys
from pathlib import Path

import cv2
import jittor as jt
import numpy as np
import pytest

from ccnet.data.datasets import build_dataset
from ccnet.engine.evaluate import evaluate
from ccnet.engine.inference import predict, tile_starts

ROOT = Path(__file__).resolve().parents[1]


class StubModel:
    """Any function of the (1, C, h, w) input as NumPy; evaluate() also needs the train/eval switches."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return jt.array(np.ascontiguousarray(self.fn(x.numpy()), np.float32))

    def is_training(self):
        return False

    def eval(self):
        pass

    def train(self):
        pass


def pointwise(weight, bias):
    """logits[k] = sum_c weight[k, c] x[c] + bias[k] at every pixel: no context, flip-equivariant."""
    return StubModel(lambda x: np.einsum("kc,nchw->nkhw", weight, x) + bias[None, :, None, None])


def image(h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(3, h, w)).astype(np.float32)


RNG = np.random.default_rng(1)
LINEAR = pointwise(RNG.normal(size=(5, 3)), RNG.normal(size=5))


def test_tile_starts_cover_the_image():
    assert tile_starts(1024, 769, 513) == [0, 255] and tile_starts(2048, 769, 513) == [0, 513, 1026, 1279]
    assert tile_starts(500, 769, 513) == [0]
    for size in range(5, 80):
        for tile, stride in ((5, 3), (16, 16), (16, 7), (30, 29)):
            starts = tile_starts(size, tile, stride)
            covered = np.zeros(size, bool)
            for s in starts:
                covered[s : s + tile] = True
            assert covered.all() and starts[0] == 0 and min(starts[-1] + tile, size) == size
            assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))  # regular, no gaps, no repeats
            assert starts[-1] == max(size - tile, 0)


@pytest.mark.parametrize("h,w,tile,stride", [(37, 53, (16, 24), (10, 13)), (9, 11, (16, 24), (8, 8))])
def test_sliding_equals_whole_for_a_pointwise_model(h, w, tile, stride):
    x = image(h, w)
    whole = predict(LINEAR, x)
    assert whole.shape == (5, h, w)
    np.testing.assert_allclose(predict(LINEAR, x, "slide", tile, stride), whole, rtol=1e-5, atol=1e-5)


def test_sliding_averages_overlapping_windows():
    """A model that outputs its window's mean: where windows overlap, the result is the mean of theirs."""
    x = image(10, 16)
    window_mean = StubModel(lambda v: np.full((1, 1) + v.shape[2:], v[0, 0].mean()))
    out = predict(window_mean, x, "slide", (10, 10), (10, 6))[0]  # windows at x = 0 and 6
    left, right = x[0, :, :10].mean(), x[0, :, 6:].mean()
    np.testing.assert_allclose(out[:, :6], left, rtol=1e-5)
    np.testing.assert_allclose(out[:, 6:10], (left + right) / 2, rtol=1e-5)
    np.testing.assert_allclose(out[:, 10:], right, rtol=1e-5)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_average(mode):
    x = image(12, 20)
    np.testing.assert_allclose(predict(LINEAR, x, mode, (8, 8), (5, 5), flip=True), predict(LINEAR, x), atol=1e-5)
    ramp = np.arange(20, dtype=np.float32)  # a model that knows left from right: not flip-equivariant
    with_ramp = StubModel(lambda v: v[:, :1] + ramp[-v.shape[3] :])
    out = predict(with_ramp, x, "whole", flip=True)[0]
    np.testing.assert_allclose(out, x[0] + (ramp + ramp[::-1]) / 2, atol=1e-5)


def test_each_scale_runs_at_its_size_and_logits_are_averaged():
    size_of_input = StubModel(
        lambda v: np.stack([np.full(v.shape[2:], v.shape[2]), np.full(v.shape[2:], v.shape[3])])[None]
    )
    out = predict(size_of_input, image(40, 60), scales=(0.5, 1.0, 1.75), flip=True)
    assert out.shape == (2, 40, 60)
    np.testing.assert_allclose(out[0], (20 + 40 + 70) / 3, rtol=1e-6)
    np.testing.assert_allclose(out[1], (30 + 60 + 105) / 3, rtol=1e-6)
    constant = np.ones((3, 40, 60), np.float32)  # a constant image stays constant at any scale
    ms = predict(LINEAR, constant, "slide", (16, 16), (12, 12), scales=(0.75, 1.25), flip=True)
    np.testing.assert_allclose(ms, predict(LINEAR, constant), atol=1e-5)


def test_unknown_mode():
    with pytest.raises(ValueError, match="eval.mode='tiles'"):
        predict(LINEAR, image(4, 4), "tiles")


def test_metrics_and_submission_through_evaluate(compose, tmp_path):
    """One Cityscapes image whose red channel encodes the prediction; IoUs computed by hand."""
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
    label_id_of = {0: 7, 1: 8, 2: 11, 255: 0}
    name = "aachen_000000_000019"
    (tmp_path / "leftImg8bit/val/aachen").mkdir(parents=True)
    (tmp_path / "gtFine/val/aachen").mkdir(parents=True)
    rgb = np.zeros(gt.shape + (3,), np.uint8)
    rgb[..., 0] = 10 * pred
    cv2.imwrite(str(tmp_path / f"leftImg8bit/val/aachen/{name}_leftImg8bit.png"), rgb[..., ::-1])
    cv2.imwrite(
        str(tmp_path / f"gtFine/val/aachen/{name}_gtFine_labelIds.png"),
        np.vectorize(label_id_of.get)(gt).astype(np.uint8),
    )
    cfg = compose(["dataset=cityscapes", f"dataset.root={tmp_path}", "dataset.mean=[0,0,0]", "dataset.std=[1,1,1]"])
    val = build_dataset(cfg.dataset, "val")
    k = np.arange(19, dtype=np.float64)
    weight = np.stack([k, 0 * k, 0 * k], 1)  # logits_k = k * red - 5 k^2: largest for k = red / 10
    model = pointwise(weight, -5 * k**2)
    metrics, _ = evaluate(model, val, cfg.dataset, cfg.eval, submission_dir=tmp_path / "submission")
    iou = metrics["per_class_iou"]
    assert iou["road"] == pytest.approx(2 / 3) and iou["sidewalk"] == pytest.approx(1 / 2)
    assert iou["building"] == pytest.approx(1 / 2) and iou["sky"] is None and len(metrics["absent_classes"]) == 16
    assert metrics["mIoU"] == pytest.approx(5 / 9)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 7) and metrics["mean_accuracy"] == pytest.approx(7 / 9)
    assert metrics["pixels"] == 7

    written = cv2.imread(str(tmp_path / "submission" / f"{name}_leftImg8bit.png"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint8 and written.shape == gt.shape
    np.testing.assert_array_equal(written, np.vectorize(label_id_of.get)(pred))  # label ids, not train ids
    np.testing.assert_array_equal(val.label_lut[written], pred)  # and back


def test_run_py_without_data_gives_the_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "experiment=cityscapes_r101",
            "dataset.root=/nonexistent",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in output
    assert "/nonexistent does not exist" in output and "https://www.cityscapes-dataset.com/downloads/" in output
