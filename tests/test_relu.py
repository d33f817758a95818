"""ccnet.ops.relu.ReLU: the threaded CPU training path against NumPy and Jittor's ReLU."""

import jittor as jt
import numpy as np
import pytest
from jittor import nn

from ccnet.ops.relu import ReLU


def forward_backward(module, x, g):
    xv = jt.array(x)
    y = module(xv)
    return y.numpy(), jt.grad((y * jt.array(g)).sum(), xv).numpy()


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 17), (1, 64, 33, 31)])
def test_training_path_matches_numpy_and_jittor(shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[0] = 0.0  # the kink: value 0 and grad 0, as PyTorch and Jittor
    g = rng.standard_normal(shape).astype(np.float32)
    module = ReLU()
    module.train()
    y, dx = forward_backward(module, x, g)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(dx, np.where(x > 0, g, 0))
    assert dx.flat[0] == 0.0
    reference = nn.ReLU()
    y_jt, dx_jt = forward_backward(reference, x, g)
    np.testing.assert_array_equal(y, y_jt)
    np.testing.assert_array_equal(dx, dx_jt)


def test_second_order_use_and_chains():
    # the saved output is what the backward reads: two ReLUs in a row and a ReLU whose input is reused
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    g = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    module = ReLU()
    module.train()
    xv = jt.array(x)
    y = module(module(xv * 2.0) - 0.5) + xv
    dx = jt.grad((y * jt.array(g)).sum(), xv).numpy()
    inner = 2.0 * x
    expected = np.where(np.maximum(inner, 0) - 0.5 > 0, g, 0) * np.where(inner > 0, 2.0, 0) + g
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-6)


def test_eval_and_float64_use_jittors_relu():
    x = np.random.default_rng(4).standard_normal((2, 3, 4, 4))
    module = ReLU()
    module.eval()
    np.testing.assert_array_equal(module(jt.array(x.astype(np.float32))).numpy(), np.maximum(x, 0).astype(np.float32))
    module.train()
    y = module(jt.array(x.astype(np.float32)).float64())
    assert y.dtype == "float64"
    np.testing.assert_allclose(y.numpy(), np.maximum(x, 0), rtol=1e-6)
