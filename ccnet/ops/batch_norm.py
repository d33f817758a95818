"""BatchNorm with a one-pass, float64 per-channel reduction on the CPU (the same module and state as Jittor's).

Jittor's BatchNorm reduces over (B, H, W) with its generic reduce ops, which were slow on the CPU
(benchmarks/README.md). Here one small kernel (csrc/batch_norm_cpu.h) computes, per channel, sum(a) and
sum(a * b) in a single pass with float64 accumulators: (x, x) for the batch statistics in the forward, (dy, x) for
the backward, whose remaining work is one elementwise expression per tensor. On the GPU, in eval mode and with
kernels.batch_norm=jittor, Jittor's own code runs. Semantics are Jittor's: biased batch variance (also for the
running variance), `momentum`, `eps`, and statistics synchronised over MPI ranks when `sync` is set.
"""

from __future__ import annotations

import math

import jittor as jt
import numpy as np
from jittor import nn

from . import source, use_fused


def channel_sums(a: jt.Var, b: jt.Var) -> tuple[jt.Var, jt.Var]:
    """Per-channel float64 (sum a, sum a * b) over every axis but 1 of two equal (B, C, ...) float32 tensors."""
    flat = [x.reshape(x.shape[0], x.shape[1], -1) for x in (a, b)]  # sizes from shapes: one compile for all
    sums = jt.code(
        [(a.shape[1],), (a.shape[1],)],
        ["float64", "float64"],
        flat,
        cpu_header=source("batch_norm_cpu.h"),
        cpu_src="bn_cpu::channel_sums(in0_p, in1_p, out0_p, out1_p, in0_shape0, in0_shape1, in0_shape2);",
    )
    return sums[0], sums[1]


def _per_channel(v: jt.Var, ndim: int) -> jt.Var:
    return v.float32().reshape((1, -1) + (1,) * (ndim - 2))


class _TrainBatchNorm(jt.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with batch statistics, and its exact backward."""

    def execute(self, x, weight, bias, eps: float, sync: bool):
        sync = sync and jt.in_mpi
        count = math.prod(x.shape) // x.shape[1] * (jt.world_size if sync else 1)
        total, total_sq = channel_sums(x, x)
        if sync:
            total, total_sq = total.mpi_all_reduce("add"), total_sq.mpi_all_reduce("add")
        mean = total / count
        var = (total_sq / count - mean * mean).maximum(0.0)
        inv_std = 1.0 / (var + eps).sqrt()
        scale = weight.float64() * inv_std
        self.saved = (x, weight, mean, inv_std, count, sync)
        self.batch_mean, self.batch_var = mean.float32(), var.float32()
        return x * _per_channel(scale, x.ndim) + _per_channel(bias.float64() - mean * scale, x.ndim)

    def grad(self, grad_y):
        x, weight, mean, inv_std, count, sync = self.saved
        if grad_y is None:
            return None, None, None
        sum_dy, sum_dy_x = channel_sums(grad_y, x)
        sum_dy_xhat = (sum_dy_x - mean * sum_dy) * inv_std  # this rank's: weight and bias grads are per rank
        grad_weight, grad_bias = sum_dy_xhat.float32(), sum_dy.float32()
        if sync:  # the input grad goes through the shared statistics: sums over all ranks
            sum_dy, sum_dy_xhat = sum_dy.mpi_all_reduce("add"), sum_dy_xhat.mpi_all_reduce("add")
        # dx = k1 (dy - sum_dy / N - xhat sum_dy_xhat / N), written as dy k1 + x k2 + k3 per channel
        k1 = weight.float64() * inv_std
        k2 = -k1 * inv_std * sum_dy_xhat / count
        k3 = -k2 * mean - k1 * sum_dy / count
        nd = x.ndim
        grad_x = grad_y * _per_channel(k1, nd) + x * _per_channel(k2, nd) + _per_channel(k3, nd)
        return grad_x, grad_weight, grad_bias


class BatchNorm2d(nn.BatchNorm):
    """jt.nn.BatchNorm (same arguments, parameters and buffers) with the fast CPU training path."""

    def execute(self, x):
        if x.dtype == "float16":  # schedule.amp: statistics and running buffers in float32, as PyTorch's autocast;
            with jt.flag_scope(auto_mixed_precision_level=0):  # amp would make eps and momentum float16
                return self.execute(x.float32()).float16()
        plain = not self.is_train or jt.flags.use_cuda or not self.affine or x.dtype != "float32"
        if plain or not one_pass_available():
            return super().execute(x)
        return _one_pass_step(self, x)


def _one_pass_step(module: nn.BatchNorm, x: jt.Var) -> jt.Var:
    """A training step of `module` through the one-pass kernel: normalised output, running statistics updated."""
    fn = _TrainBatchNorm()
    y = fn(x, module.weight, module.bias, module.eps, module.sync)
    module.running_mean.update(module.running_mean + (fn.batch_mean - module.running_mean) * module.momentum)
    module.running_var.update(module.running_var + (fn.batch_var - module.running_var) * module.momentum)
    return y


def _self_test() -> None:
    """Compile the kernel and compare a training step (output, grads, running statistics) with Jittor's BatchNorm."""
    rng = np.random.default_rng(0)
    x = jt.array((rng.standard_normal((2, 3, 5, 4)) * 2 + 1).astype(np.float32))
    g = jt.array(rng.standard_normal((2, 3, 5, 4)).astype(np.float32))
    results = []
    for step in (_one_pass_step, nn.BatchNorm.execute):
        module = nn.BatchNorm(3)
        module.train()
        module.weight.update(jt.array([0.5, 1.0, 2.0]))
        with jt.enable_grad():
            y = step(module, x)
            results.append([y, *jt.grad((y * g).sum(), [x, module.weight, module.bias]), module.running_var])
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_var"), *results):
        if not np.allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{name} differs from Jittor's BatchNorm")


def one_pass_available() -> bool:
    """kernels.batch_norm=fused and the one-pass kernel compiled and agrees with Jittor's BatchNorm (checked once)."""
    return use_fused("batch_norm", _self_test, "one-pass batch norm")
