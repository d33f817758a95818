"""Attention maps loop by loop (criss-cross after loop 1, the whole image after loop 2), visualize and predict."""

import cv2
import numpy as np
import pytest
from conftest import CONTEXT_TINY


def criss_cross(h, w, y, x):
    mask = np.zeros((h, w), bool)
    mask[y, :] = mask[:, x] = True
    return mask


def test_loop_maps_of_random_attention():
    from ccnet.engine.attention import point_maps

    rng = np.random.default_rng(0)
    h, w = 5, 7
    attentions = []
    for _ in range(3):
        a = rng.random((h, w, h + w))
        a[np.arange(h), :, np.arange(h)] = 0  # the centre is counted in the row part only
        attentions.append(a / a.sum(-1, keepdims=True))
    one, two, three = point_maps(attentions, 2, 3)
    assert one.sum() == pytest.approx(1) and np.all((one > 0) == criss_cross(h, w, 2, 3))
    assert two.sum() == pytest.approx(1) and three.sum() == pytest.approx(1) and np.all(two > 0)
    # loop 2 = half the direct path (loop 2's own weights) + half through each position's loop-1 map
    dense1 = np.zeros((h * w, h * w))
    dense2 = np.zeros((h * w, h * w))
    for dense, a in ((dense1, attentions[0]), (dense2, attentions[1])):
        for y in range(h):
            for x in range(w):
                row = np.zeros((h, w))
                row[:, x] += a[y, x, :h]
                row[y, :] += a[y, x, h:]
                dense[y * w + x] = row.ravel()
    expected = (dense2 @ (np.eye(h * w) + dense1) / 2)[2 * w + 3].reshape(h, w)
    np.testing.assert_allclose(two, expected, atol=1e-12)


def test_model_attention_of_a_point(trained, compose):
    import jittor as jt

    from ccnet.data.datasets import build_dataset
    from ccnet.data.transforms import eval_transform
    from ccnet.engine.attention import attention_maps_at, point_maps
    from ccnet.models import build_model

    cfg = compose(CONTEXT_TINY)
    model = build_model(cfg)
    model.eval()
    image, _ = build_dataset(cfg.dataset, "val").read(0)
    normalised = eval_transform(image, cfg.dataset)
    with jt.no_grad():
        _, feature = model.backbone(jt.array(normalised[None]))
        attentions = [a.numpy()[0] for a in model.head.attention_maps(feature)]
    h, w = attentions[0].shape[:2]  # 32 x 256 at output stride 8 (ceil-mode pooling): 5 x 33
    assert len(attentions) == 2 and attentions[1].shape == (h, w, h + w) and (h, w) == (5, 33)
    one, two = point_maps(attentions, 2, 28)
    assert one.sum() == pytest.approx(1, abs=1e-5) and np.all((one > 0) == criss_cross(h, w, 2, 28))
    assert two.sum() == pytest.approx(1, abs=1e-5) and np.all(two > 0)
    up_one, up_two = attention_maps_at(model, normalised, (16, 230))
    assert up_one.shape == up_two.shape == image.shape[:2] and np.all(up_two > 0) and np.any(up_one == 0)


def test_visualize_writes_the_figure(trained, compose, tmp_path):
    from ccnet.registry import JOBS

    JOBS.get("visualize").factory(compose(["job=visualize", f"checkpoint={trained}", "point=[16,230]"]), tmp_path)
    (png,) = tmp_path.glob("attention_0000_y16_x230.png")
    figure = cv2.imread(str(png))
    assert figure.shape == (3 * (20 + 128), 1024, 3)  # input, loop 1, loop 2: stacked, 32 x 256 enlarged 4x
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    JOBS.get("visualize").factory(compose(["job=visualize", f"checkpoint={trained}"]), tmp_path / "default")
    assert len(list((tmp_path / "default").glob("attention_0000_y*_x*.png"))) == 1  # a point on an object


def test_predict_on_a_folder(trained, compose, tmp_path, data_home):
    from ccnet.registry import JOBS

    images = tmp_path / "in"
    images.mkdir()
    val = data_home / "context_v7" / "images" / "val"
    cv2.imwrite(str(images / "a.png"), cv2.imread(str(val / "0000.png")))
    cv2.imwrite(str(images / "b.jpg"), cv2.imread(str(val / "0001.png")))
    out = tmp_path / "out"
    JOBS.get("predict").factory(compose(["job=predict", f"checkpoint={trained}", f"input={images}"]), out)
    for name in ("a", "b"):
        ids = cv2.imread(str(out / "ids" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert ids.shape == (32, 256) and ids.max() < 4
        assert cv2.imread(str(out / "color" / f"{name}.png")).shape == (32, 256, 3)
        assert cv2.imread(str(out / "overlay" / f"{name}.png")).shape == (32, 256, 3)
