"""ccnet.models.norm.BatchNorm2d: the CPU training path against NumPy float64 and against Jittor's BatchNorm."""

import jittor as jt
import numpy as np
import pytest
from jittor import nn

from ccnet.ops.batch_norm import BatchNorm2d, channel_sums


def numpy_batch_norm(x, g, weight, bias, eps):
    """Forward and backward of training-mode batch norm in float64, textbook form (per channel over N, H, W)."""
    axes = (0, 2, 3)
    n = x.size // x.shape[1]
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    w = weight.reshape(1, -1, 1, 1)
    y = xhat * w + bias.reshape(1, -1, 1, 1)
    grad_bias = g.sum(axes)
    grad_weight = (g * xhat).sum(axes)
    dxhat = g * w
    grad_x = (n * dxhat - dxhat.sum(axes, keepdims=True) - xhat * (dxhat * xhat).sum(axes, keepdims=True)) / (
        n * np.sqrt(var + eps)
    )
    return y, grad_x, grad_weight, grad_bias, mean.ravel(), var.ravel()


def run(bn, x, g):
    xv = jt.array(x.astype(np.float32))
    y = bn(xv)
    grads = jt.grad((y * jt.array(g.astype(np.float32))).sum(), [xv, bn.weight, bn.bias])
    return [y.numpy()] + [v.numpy() for v in grads] + [bn.running_mean.numpy(), bn.running_var.numpy()]


@pytest.mark.parametrize("shape, offset", [((2, 5, 7, 9), 1.0), ((1, 3, 33, 17), 300.0), ((4, 2, 1, 1), 0.0)])
def test_training_path_matches_float64_and_jittor(shape, offset):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 2.5 + offset
    g = rng.standard_normal(shape)
    weight, bias = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y, gx, gw, gb, mean, var = numpy_batch_norm(x, g, weight, bias, 1e-5)

    ours, theirs = BatchNorm2d(shape[1], momentum=0.25), nn.BatchNorm2d(shape[1], momentum=0.25)
    for bn in (ours, theirs):
        bn.weight.update(jt.array(weight.astype(np.float32)))
        bn.bias.update(jt.array(bias.astype(np.float32)))
        bn.train()
    got, jittor = run(ours, x, g), run(theirs, x, g)
    running_mean, running_var = 0.25 * mean, 0.75 + 0.25 * var  # from 0 and 1; biased variance, as Jittor
    for name, a, ref in zip(["y", "dx", "dw", "db", "rmean", "rvar"], got, [y, gx, gw, gb, running_mean, running_var]):
        scale = max(np.abs(ref).max(), 1.0)
        assert np.abs(a - ref).max() / scale < 2e-5, name
    # Jittor's own float32 statistics lose digits to a large offset (at 300: ~1 % in dw); ours must not
    assert np.abs(got[0] - y).max() <= np.abs(jittor[0] - y).max() + 1e-6
    if offset < 10:
        for a, b in zip(got, jittor):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_eval_mode_uses_the_running_statistics():
    bn = BatchNorm2d(3)
    bn.running_mean.update(jt.array(np.array([1.0, -2.0, 0.5], np.float32)))
    bn.running_var.update(jt.array(np.array([4.0, 0.25, 1.0], np.float32)))
    bn.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    expected = (x - np.array([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)) / np.sqrt(
        np.array([4.0, 0.25, 1.0]).reshape(1, 3, 1, 1) + 1e-5
    )
    np.testing.assert_allclose(bn(jt.array(x.astype(np.float32))).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}  # Jittor's keys


def test_channel_sums_are_float64_exact_for_many_elements():
    # 2^25 ones per channel: a float32 running sum stops at 2^24
    a = jt.ones((2, 1, 4096, 4096))
    total, total_sq = channel_sums(a, a * 3)
    assert total.dtype == "float64" and total.item() == 2**25 and total_sq.item() == 3 * 2**25
