"""ReLU whose CPU training path runs on all threads (the same module as Jittor's, no parameters).

Jittor's CPU elementwise kernels run on one thread, and its ReLU backward (a ternary on x > 0) took ~0.75 s of a
ResNet-101 training step at 512x512 (PyTorch's: ~0.3 s). Here forward and backward are one OpenMP loop each:
y = max(x, 0), and dx = dy where y > 0, else 0 (reading the saved output, not the input). In eval mode and on the
GPU, Jittor's own ReLU runs, where it fuses with its neighbours.
"""

from __future__ import annotations

import jittor as jt
from jittor import nn

_SOURCE = r"""
namespace relu_cpu {
inline void forward(const float* x, float* y, long n) {
#pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++)
        y[i] = x[i] > 0.f ? x[i] : 0.f;
}
inline void backward(const float* y, const float* dy, float* dx, long n) {
#pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++)
        dx[i] = y[i] > 0.f ? dy[i] : 0.f;
}
}  // namespace relu_cpu
"""


class _TrainReLU(jt.Function):
    def execute(self, x):
        y = jt.code(x.shape, x.dtype, [x], cpu_header=_SOURCE, cpu_src="relu_cpu::forward(in0_p, out0_p, in0->num);")
        self.y = y
        return y

    def grad(self, grad_y):
        if grad_y is None:
            return None
        return jt.code(
            grad_y.shape,
            grad_y.dtype,
            [self.y, grad_y],
            cpu_header=_SOURCE,
            cpu_src="relu_cpu::backward(in0_p, in1_p, out0_p, in0->num);",
        )


class ReLU(nn.ReLU):
    """jt.nn.ReLU with the multi-threaded CPU training path."""

    threaded = True  # class-wide switch: False runs Jittor's ReLU (for A/B benchmarks)

    def execute(self, x):
        if x.dtype == "float16":  # schedule.amp; Jittor's relu compares with a float32 0, which float16 cannot compile
            return x.maximum(jt.zeros(1, dtype=x.dtype))
        if not self.threaded or not self.is_train or jt.flags.use_cuda or x.dtype != "float32":
            return super().execute(x)
        return _TrainReLU.apply(x)


class LeakyReLU(nn.Module):
    """Jittor's leaky_relu; in float16 (schedule.amp) with a float16 0, as Jittor's compares with a float32 one."""

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = slope

    def execute(self, x):
        if x.dtype == "float16":
            return jt.ternary(x > jt.zeros_like(x), x, x * self.slope)
        return nn.leaky_relu(x, self.slope)
