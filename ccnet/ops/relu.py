"""ReLU whose CPU training path runs on all threads (the same module as Jittor's, no parameters).

Jittor's CPU elementwise kernels run on one thread, and its ReLU backward (a ternary on x > 0) was a visible part
of a ResNet-101 training step (benchmarks/README.md). Here forward and backward are one OpenMP loop each
(csrc/relu_cpu.h): y = max(x, 0), and dx = dy where y > 0, else 0 (reading the saved output, not the input). In eval
mode, on the GPU and with kernels.relu=jittor, Jittor's own ReLU runs, where it fuses with its neighbours.
"""

from __future__ import annotations

import jittor as jt
import numpy as np
from jittor import nn

from . import source, use_fused


class _TrainReLU(jt.Function):
    def execute(self, x):
        y = jt.code(
            x.shape,
            x.dtype,
            [x],
            cpu_header=source("relu_cpu.h"),
            cpu_src="relu_cpu::forward(in0_p, out0_p, in0->num);",
        )
        self.y = y
        return y

    def grad(self, grad_y):
        if grad_y is None:
            return None
        return jt.code(
            grad_y.shape,
            grad_y.dtype,
            [self.y, grad_y],
            cpu_header=source("relu_cpu.h"),
            cpu_src="relu_cpu::backward(in0_p, in1_p, out0_p, in0->num);",
        )


class ReLU(nn.ReLU):
    """jt.nn.ReLU with the multi-threaded CPU training path."""

    def execute(self, x):
        if x.dtype == "float16":  # schedule.amp; Jittor's relu compares with a float32 0, which float16 cannot compile
            return x.maximum(jt.zeros(1, dtype=x.dtype))
        if not self.is_train or jt.flags.use_cuda or x.dtype != "float32" or not threaded_available():
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


def _self_test() -> None:
    """Compile both loops and compare with Jittor's ReLU, forward and backward, on a small case with zeros."""
    rng = np.random.default_rng(0)
    x = jt.array(np.round(rng.standard_normal((3, 5, 7)), 1).astype(np.float32))  # rounding puts some x at 0
    g = jt.array(rng.standard_normal((3, 5, 7)).astype(np.float32))
    with jt.enable_grad():
        results = [[y] + jt.grad((y * g).sum(), [x]) for y in (_TrainReLU.apply(x), nn.relu(x))]
    for name, a, b in zip(("y", "dx"), *results):
        if not np.array_equal(a.numpy(), b.numpy()):
            raise RuntimeError(f"{name} differs from Jittor's ReLU")


def threaded_available() -> bool:
    """kernels.relu=fused and the OpenMP loops compiled and agree with Jittor's ReLU (checked once)."""
    return use_fused("relu", _self_test, "threaded ReLU")
