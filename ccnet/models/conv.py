"""Conv2d whose CPU forward asks oneDNN for its training kernels (the same module and weights as Jittor's).

Jittor's CPU convolution forward creates its oneDNN primitive with `prop_kind::forward_inference`, for which
oneDNN 2.6 picks its brgemm kernels; with `forward_training` it picks the direct JIT kernels, which PyTorch gets
too and which are faster on this machine's AVX-512 cores (2 threads, a C++ harness, prop kind the only
difference): 3x3 dilation 4 512->512 at 64x64 82-85 vs 116-123 ms, 1x1 1024->256 11.4 vs 18.3 ms; a ResNet-50
step's forward convolutions 2.16 s vs 2.75 s. Here the forward is one small custom op calling oneDNN with
`forward_training`; the backward is Jittor's own oneDNN ops (`mkl_conv_backward_x`, `mkl_conv_backward_w`),
which already use the direct kernels. Grouped convolutions, other dtypes, the GPU and Jittor without oneDNN
take Jittor's path.
"""

from __future__ import annotations

import jittor as jt
import numpy as np
from jittor import nn

from .fallback import passes_self_test

_FORWARD_SOURCE = r"""
#include <dnnl.hpp>

namespace ccnet_conv {
// y = conv(x, w): x (n, c, h, w), w (oc, c, kh, kw), y (n, oc, oh, ow), all plain NCHW / OIHW float32;
// p = stride, padding, dilation (h, w each). oneDNN chooses its own blocked layouts; inputs are reordered into
// them and the output back.
inline void forward(const float* x, const float* w, const int* p, float* y, int n, int c, int h, int wd, int oc,
                    int kh, int kw, int oh, int ow) {
    const int sh = p[0], sw = p[1], ph = p[2], pw = p[3], dh = p[4], dw = p[5];
    using namespace dnnl;
    using tag = memory::format_tag;
    const auto f32 = memory::data_type::f32;
    static engine eng(engine::kind::cpu, 0);
    stream s(eng);
    memory::dims src_dims{n, c, h, wd}, wei_dims{oc, c, kh, kw}, dst_dims{n, oc, oh, ow};
    auto desc = convolution_forward::desc(
        prop_kind::forward_training, algorithm::convolution_direct, memory::desc(src_dims, f32, tag::any),
        memory::desc(wei_dims, f32, tag::any), memory::desc(dst_dims, f32, tag::any), {sh, sw},
        {dh - 1, dw - 1}, {ph, pw}, {ph, pw});  // oneDNN counts dilation from 0
    auto pd = convolution_forward::primitive_desc(desc, eng);
    memory user_src({src_dims, f32, tag::nchw}, eng, const_cast<float*>(x));
    memory user_wei({wei_dims, f32, tag::oihw}, eng, const_cast<float*>(w));
    memory user_dst({dst_dims, f32, tag::nchw}, eng, y);
    auto src = user_src, wei = user_wei, dst = user_dst;
    if (pd.src_desc() != user_src.get_desc()) {
        src = memory(pd.src_desc(), eng);
        reorder(user_src, src).execute(s, user_src, src);
    }
    if (pd.weights_desc() != user_wei.get_desc()) {
        wei = memory(pd.weights_desc(), eng);
        reorder(user_wei, wei).execute(s, user_wei, wei);
    }
    if (pd.dst_desc() != user_dst.get_desc())
        dst = memory(pd.dst_desc(), eng);
    convolution_forward(pd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    if (dst != user_dst)
        reorder(dst, user_dst).execute(s, dst, user_dst);
    s.wait();
}
}  // namespace ccnet_conv
"""


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
            cpu_header=_FORWARD_SOURCE,
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
    """True where this module's CPU forward runs: on the CPU, Jittor built its oneDNN ops, and our op compiled
    and agreed with Jittor's conv (checked once; if not, a warning and Jittor's conv from then on). <dnnl.hpp> is
    found through the include path that ccnet.runtime.setup() sets."""
    if jt.flags.use_cuda or getattr(jt.compile_extern, "mkl_ops", None) is None:
        return False
    return passes_self_test(("conv",), _self_test, "oneDNN conv forward", "Jittor's conv")


class Conv2d(nn.Conv2d):
    """jt.nn.Conv2d (same arguments, parameters and state-dict keys) with the faster oneDNN forward on the CPU."""

    onednn_forward = True  # class-wide switch: False runs Jittor's own forward (for A/B benchmarks)

    def execute(self, x):
        plain = self.groups != 1 or x.dtype != "float32" or self.weight.dtype != "float32"
        if plain or not self.onednn_forward or not onednn_forward_available():
            return super().execute(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        y = _OneDNNConv.apply(x, self.weight, self.stride, self.padding, self.dilation)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y
