"""ccnet.ops.conv.Conv2d: the oneDNN training forward and its backward against NumPy float64 and Jittor's conv."""

import jittor as jt
import numpy as np
import pytest
from jittor import nn

from ccnet import ops
from ccnet.ops.conv import Conv2d, onednn_forward_available


def numpy_conv(x, w, b, stride, padding, dilation):
    """Cross-correlation in float64, one output position at a time, and the grads of sum(y * g)."""
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, oc, oh, ow))
    windows = {}
    for i, j in np.ndindex(oh, ow):
        rows = i * stride[0] + dilation[0] * np.arange(kh)
        cols = j * stride[1] + dilation[1] * np.arange(kw)
        windows[i, j] = np.ix_(rows, cols)
        y[:, :, i, j] = np.einsum("nckl,ockl->no", xp[:, :, rows][:, :, :, cols], w)
    y += b.reshape(1, -1, 1, 1)
    return y, windows, xp.shape


def numpy_conv_grads(x, w, g, stride, padding, dilation):
    _, windows, padded_shape = numpy_conv(x, w, np.zeros(w.shape[0]), stride, padding, dilation)
    grad_xp, grad_w = np.zeros(padded_shape), np.zeros(w.shape)
    for (i, j), (rows, cols) in windows.items():
        patch = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))[:, :, rows, cols]
        grad_w += np.einsum("no,nckl->ockl", g[:, :, i, j], patch)
        grad_xp[:, :, rows, cols] += np.einsum("no,ockl->nckl", g[:, :, i, j], w)
    h, wd = x.shape[2:]
    grad_x = grad_xp[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + wd]
    return grad_x, grad_w, g.sum((0, 2, 3))


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def run(conv, x, g):
    xv = jt.array(x.astype(np.float32))
    y = conv(xv)
    wrt = [xv, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    grads = jt.grad((y * jt.array(g.astype(np.float32))).sum(), wrt)
    return [y.numpy()] + [v.numpy() for v in grads]


CASES = [  # in, out, kernel, stride, padding, dilation, input (B, H, W), bias
    (3, 8, 3, 2, 1, 1, (2, 11, 9), False),  # the stem: stride 2, odd sizes
    (6, 5, 3, 1, 2, 2, (1, 10, 13), True),  # dilated as in layer3
    (4, 7, 3, 1, 4, 4, (2, 9, 12), False),  # dilated as in layer4, kernel wider than the input
    (8, 16, 1, 1, 0, 1, (2, 6, 5), True),  # 1x1
    (8, 4, 1, 2, 0, 1, (1, 7, 7), False),  # strided 1x1 (downsample)
    (5, 3, 7, 4, 3, 1, (1, 13, 15), True),  # VAN's patch embedding: 7x7, stride 4
]


@pytest.mark.skipif(not onednn_forward_available(), reason="needs Jittor's oneDNN ops (CPU)")
@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation, size, bias", CASES)
def test_matches_float64_reference_and_jittor_conv(cin, cout, k, stride, padding, dilation, size, bias):
    rng = np.random.default_rng(cin * 100 + cout * 10 + k)
    conv = Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = rng.standard_normal((size[0], cin, size[1], size[2]))
    pair = (stride,) * 2, (padding,) * 2, (dilation,) * 2
    w = conv.weight.numpy().astype(np.float64)
    b = conv.bias.numpy().astype(np.float64) if bias else np.zeros(cout)
    y_ref, _, _ = numpy_conv(x, w, b, *pair)
    g = rng.standard_normal(y_ref.shape)
    expected = [y_ref, *numpy_conv_grads(x, w, g, *pair)][: 4 if bias else 3]

    ours = run(conv, x, g)
    for name, a, e in zip(["y", "dx", "dw", "db"], ours, expected):
        assert a.shape == e.shape, name
        assert relative_error(a, e) < 1e-5, (name, relative_error(a, e))

    with ops.using(conv="jittor"):  # Jittor's own conv, same module and weights
        theirs = run(conv, x, g)
    for name, a, t in zip(["y", "dx", "dw", "db"], ours, theirs):
        assert relative_error(a, t) < 1e-5, name


def test_same_parameters_and_keys_as_jittor_conv():
    ours, theirs = Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    theirs.load_state_dict(ours.state_dict())
    x = jt.array(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-5, atol=1e-5)


def test_grouped_and_float64_take_jittors_path():
    # groups > 1 (VAN's depthwise convs) and other dtypes run Jittor's conv: same results as nn.Conv2d
    rng = np.random.default_rng(1)
    ours, theirs = Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 3, padding=1, groups=6)
    theirs.load_state_dict(ours.state_dict())
    x = jt.array(rng.standard_normal((2, 6, 5, 7)).astype(np.float32))
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-6, atol=1e-6)
    conv = Conv2d(2, 3, 3, padding=1)
    x64 = rng.standard_normal((1, 2, 5, 5))
    y = conv(jt.array(x64.astype(np.float32)).float64())
    assert y.dtype == "float64"
    w, b = conv.weight.numpy().astype(np.float64), conv.bias.numpy().astype(np.float64)
    assert relative_error(y.numpy(), numpy_conv(x64, w, b, (1, 1), (1, 1), (1, 1))[0]) < 1e-5


def test_bad_input_is_named():
    conv = Conv2d(4, 2, 3)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        conv(jt.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="too small"):
        conv(jt.zeros((1, 4, 2, 2)))


def test_falls_back_to_jittor_conv_with_a_warning(monkeypatch):
    from ccnet.ops import conv as conv_module

    def broken():
        raise RuntimeError("dnnl.hpp: No such file or directory")

    monkeypatch.setattr(ops, "_self_tests", {})
    monkeypatch.setattr(conv_module, "_self_test", broken)
    ours, theirs = Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = jt.array(np.random.default_rng(2).standard_normal((1, 3, 6, 6)).astype(np.float32))
    with pytest.warns(UserWarning, match="dnnl.hpp"):
        y = ours(x)
    np.testing.assert_allclose(y.numpy(), theirs(x).numpy(), rtol=1e-6, atol=1e-6)
    assert ops._self_tests[("conv",)] is False


@pytest.mark.parametrize("wrong", ["dx", "dw"])
def test_self_test_checks_the_backward_under_no_grad(monkeypatch, wrong):
    """First use is often in eval (jt.no_grad()): the self-test must still compare real gradients."""
    from ccnet.ops import conv as conv_module

    real = conv_module._OneDNNConv.grad

    def off_by_ten_percent(self, grad_y):
        dx, dw = real(self, grad_y)
        return (dx * 1.1, dw) if wrong == "dx" else (dx, dw * 1.1)

    with jt.no_grad():
        conv_module._self_test()  # the real op passes
        monkeypatch.setattr(conv_module._OneDNNConv, "grad", off_by_ten_percent)
        with pytest.raises(RuntimeError, match=f"{wrong} differs from Jittor's conv"):
            conv_module._self_test()
