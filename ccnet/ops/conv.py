"""Conv2d whose CPU forward asks oneDNN for its training kernels (the same module and weights as Jittor's).

Jittor's CPU convolution forward creates its oneDNN primitive with `prop_kind::forward_inference`, for which
oneDNN 2.6 picks its brgemm kernels; with `forward_training` it picks the direct JIT kernels, which PyTorch gets
too and which were faster on this project's CPUs (measurements: benchmarks/README.md). Here the forward is one
small custom op calling oneDNN with `forward_training` (csrc/conv_onednn.h); the backward is Jittor's own oneDNN
ops (`mkl_conv_backward_x`, `mkl_conv_backward_w`), which already use the direct kernels. Grouped convolutions,
other dtypes, the GPU, Jittor without oneDNN and `kernels.conv=jittor` take Jittor's path.
"""

from __future__ import annotations

import jittor as jt
import numpy as np
from jittor import nn

from . import source, use_fused


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _OneDNNConv(jt.Function):
    """conv2d without bias, groups 1, float32 NCHW: oneDNN training forward, Jittor's oneDNN backward ops."""

    def execute(self, x, weight, stride, padding, dilation):
        n, _, h, w = x.shape
        oc, _, kh, kw = weight.shape
        oh, ow = (_out_size(s, k, st, p, d) for s, k, st, p, d in zip((h, w), (kh, kw), stride, padding, dilation))
        if oh <= 0 or ow <= 0:
            raise ValueError(f"Conv2d: input {h}x{w} is too small for kernel {kh}x{kw} (dilation {dilation})")
        self.saved = (x, weight, stride, padding, dilation)
        # sizes come from shapes and the hyper-parameters from a small input: one compiled op for every conv
        params = jt.array(np.array([*stride, *padding, *dilation], np.int32))
        return jt.code(
            (n, oc, oh, ow),
            "float32",
            [x, weight, params],
            cpu_header=source("conv_onednn.h"),
            cpu_src="ccnet_conv::forward(in0_p, in1_p, in2_p, out0_p, in0_shape0, in0_shape1, in0_shape2, in0_shape3, "
            "in1_shape0, in1_shape2, in1_shape3, out0_shape2, out0_shape3);",
        )

    def grad(self, grad_y):
        x, weight, stride, padding, dilation = self.saved
        if grad_y is None:
            return None, None
        ops = jt.compile_extern.mkl_ops
        common = (*stride, *padding, *dilation, 1, "abcd", "oihw", "abcd")
        grad_x = ops.mkl_conv_backward_x(weight, grad_y, x.shape[2], x.shape[3], *common)
        grad_w = ops.mkl_conv_backward_w(x, grad_y, weight.shape[2], weight.shape[3], *common)
        return grad_x, grad_w


def _self_test() -> None:
    """Compile the op and compare forward and grads with Jittor's conv on a small strided, dilated case."""
    rng, shapes = np.random.default_rng(0), [(2, 3, 9, 8), (4, 3, 3, 3), (2, 4, 5, 4)]
    with jt.enable_grad():  # inputs made under jt.no_grad() (first use in eval) would get all-zero grads
        x, w, g = (jt.array(rng.standard_normal(s).astype(np.float32)) for s in shapes)
        mine = _OneDNNConv.apply(x, w, (2, 2), (2, 1), (2, 1))
        theirs = nn.conv2d(x, w, None, (2, 2), (2, 1), (2, 1))
        results = [[y] + jt.grad((y * g).sum(), [x, w]) for y in (mine, theirs)]
    for name, a, b in zip(("y", "dx", "dw"), *results):
        a, b = a.numpy(), b.numpy()
        if not np.abs(b).max() > 0.1:  # the reference's values are O(1): all zero means nothing was tested
            raise RuntimeError(f"{name} of Jittor's conv is all zero in the self-test")
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{name} differs from Jittor's conv")


def onednn_forward_available() -> bool:
    """True where this module's CPU forward runs: kernels.conv=fused, on the CPU, Jittor built its oneDNN ops, and
    our op compiled and agreed with Jittor's conv (checked once; if not, a warning and Jittor's conv from then on).
    <dnnl.hpp> is found through the include path that ccnet.runtime.setup() sets."""
    if jt.flags.use_cuda or getattr(jt.compile_extern, "mkl_ops", None) is None:
        return False
    return use_fused("conv", _self_test, "oneDNN conv forward")


class Conv2d(nn.Conv2d):
    """jt.nn.Conv2d (same arguments, parameters and state-dict keys) with the faster oneDNN forward on the CPU."""

    def execute(self, x):
        plain = self.groups != 1 or x.dtype != "float32" or self.weight.dtype != "float32"
        if plain or not onednn_forward_available():
            return super().execute(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        y = _OneDNNConv.apply(x, self.weight, self.stride, self.padding, self.dilation)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y
