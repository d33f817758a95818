"""Model shapes, the RCCA head's recurrence, the losses against NumPy."""

import jittor as jt
import numpy as np
import pytest

from ccnet.models import CCNet, build_backbone
from ccnet.models.ccnet import upsample_to
from ccnet.models.heads import RCCAHead
from ccnet.models.losses import cross_entropy, ohem_cross_entropy


@pytest.mark.parametrize("size", [(97, 129), (64, 64), (33, 50)])
def test_logits_have_the_input_size_for_odd_inputs(size):
    model = CCNet(build_backbone("resnet_tiny"), num_classes=5, head_channels=16, recurrence=2)
    model.eval()
    x = jt.array(np.random.default_rng(0).standard_normal((2, 3) + size).astype(np.float32))
    logits, aux = model(x, with_aux=True)
    assert logits.shape == (2, 5) + size and aux.shape == (2, 5) + size


def bilinear_align_corners_reference(x: np.ndarray, size) -> np.ndarray:
    """Per output pixel, in float64: the four neighbours of (y (h-1)/(H-1), x (w-1)/(W-1)), weighted."""
    _, _, h, w = x.shape
    out = np.zeros(x.shape[:2] + tuple(size))
    for oy in range(size[0]):
        sy = oy * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
        y0 = min(int(np.floor(sy)), max(h - 2, 0))
        fy = sy - y0
        for ox in range(size[1]):
            sx = ox * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
            x0 = min(int(np.floor(sx)), max(w - 2, 0))
            fx = sx - x0
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            out[:, :, oy, ox] = (1 - fy) * ((1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1]) + fy * (
                (1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]
            )
    return out


@pytest.mark.parametrize(
    "shape, size", [((2, 3, 9, 8), (67, 61)), ((1, 2, 4, 5), (9, 7)), ((1, 2, 1, 5), (4, 9)), ((1, 4, 6, 6), (6, 6))]
)
def test_upsample_is_bilinear_with_aligned_corners(shape, size):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    out = upsample_to(jt.array(x.astype(np.float32)), size).numpy()
    expected = bilinear_align_corners_reference(x, size)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    if x.size > 150:
        return
    # its gradient is the transpose: <up(x), g> = <x, up^T(g)> for the float64 reference map
    g = rng.standard_normal(expected.shape)
    xv = jt.array(x.astype(np.float32))
    grad = jt.grad((upsample_to(xv, size) * jt.array(g.astype(np.float32))).sum(), xv).numpy()
    basis = np.eye(x.size).reshape((x.size,) + shape)
    transpose = np.array([(bilinear_align_corners_reference(e, size) * g).sum() for e in basis]).reshape(shape)
    np.testing.assert_allclose(grad, transpose, rtol=0, atol=1e-4)


def test_resnet_output_stride_is_8_with_dilated_layers():
    backbone = build_backbone("resnet_tiny")
    backbone.eval()
    c3, c4 = backbone(jt.zeros((1, 3, 769, 769)))
    assert c3.shape[2:] == (97, 97) and c4.shape[2:] == (97, 97)  # the authors' 769 -> 97
    assert c3.shape[1] == backbone.aux_channels and c4.shape[1] == backbone.out_channels
    dilations = [blk.conv1.dilation for blk in backbone.layer4]
    assert all(tuple(d) == (4, 4) for d in dilations)


def test_recurrence_applies_the_shared_module_r_times():
    calls = []
    head = RCCAHead(8, 8, 3, recurrence=3)
    original = head.cca.execute
    head.cca.execute = lambda x: calls.append(1) or original(x)
    head.eval()
    head(jt.zeros((1, 8, 5, 5)))
    assert len(calls) == 3
    assert len(head.attention_maps(jt.zeros((1, 8, 5, 5)))) == 3
    calls.clear()
    RCCAHead(8, 8, 3, recurrence=0).eval()(jt.zeros((1, 8, 5, 5)))
    assert calls == []


def numpy_ce(logits, target, ignore):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    valid = target != ignore
    picked = np.take_along_axis(logp, np.where(valid, target, 0)[:, None], 1)[:, 0]
    return -(picked[valid]).mean(), np.exp(picked), valid


def test_cross_entropy_ignores_the_ignore_label():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    target = rng.integers(0, 4, (2, 6, 5))
    target[0, :2] = 255
    expected, _, _ = numpy_ce(logits.astype(np.float64), target, 255)
    got = cross_entropy(jt.array(logits), jt.array(target), 255).item()
    assert abs(got - expected) < 1e-5


def test_ohem_keeps_pixels_below_the_threshold():
    rng = np.random.default_rng(3)
    logits = (3 * rng.standard_normal((1, 3, 10, 10))).astype(np.float32)
    target = rng.integers(0, 3, (1, 10, 10))
    target[0, 0] = 255
    _, prob, valid = numpy_ce(logits.astype(np.float64), target, 255)
    min_kept = 30
    kth = np.sort(prob[valid])[min_kept - 1]
    threshold = max(0.7, kth)
    keep = valid & (prob <= threshold)
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(valid, target, 0)[:, None], 1)[:, 0]
    expected = -(picked[keep]).mean()
    got = ohem_cross_entropy(jt.array(logits), jt.array(target), 255, 0.7, min_kept).item()
    assert keep.sum() >= min_kept and abs(got - expected) < 1e-5
