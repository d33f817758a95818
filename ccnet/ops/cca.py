"""Criss-cross attention ops (Huang et al., CCNet): plain Jittor ops and fused kernels of ours.

For a pixel (y, x) the op scores its column (e_H[i] = q(y,x).k(i,x)) and its row (e_W[j] = q(y,x).k(y,j)),
masks the centre in the column branch so it is counted once, takes ONE softmax over the H + W scores (no
1/sqrt(d) scaling) and returns sum_i A_H[i] v(i,x) + sum_j A_W[j] v(y,j).

- `criss_cross_attention_plain`: that maths in ~20 Jittor ops (matmuls, permutes, concat, softmax): the reference.
- `criss_cross_attention_fused`: the same in three kernels of ours (csrc/cca_cpu.h: C++/OpenMP; csrc/cca_cuda.cuh:
  CUDA): `attention` (energies of the H + W - 1 criss-cross positions and the masked softmax), `aggregate` (the
  weighted sum of values) and `aggregate_transposed` (its transpose, for the backward pass). The largest buffer is
  the (B, H + W, H, W) attention map, saved for the backward pass; nothing of size (HW)^2 exists.
  Backward: with A = softmax(E) and out = agg(A, v),
    dA = energies(grad_out, v), dE = A * (dA - sum_k A dA)   (the same kernel as the forward energies)
    dq = agg(dE, k), dk = agg_t(dE, q), dv = agg_t(A, grad_out).
  The kernels compile on first use (cached by Jittor afterwards). If they fail to compile or disagree with the
  plain ops on a small self-test, the fused op warns once and runs the plain ops instead.
- `criss_cross_attention`: the one the model calls; fused unless `kernels.cca=jittor`.

`softmax="whole"` (model.cca_softmax) takes one softmax over the whole (B, H, W, H + W) tensor instead of one per
pixel: what Jittor's `nn.Softmax()` without a dim does, and so what the seed (Trugen/ANN-Lab
cc_attention/functions.py) computed. Only the plain ops have it; the fused kernels' softmax is per pixel.
"""

from __future__ import annotations

import functools
import logging

import jittor as jt
import numpy as np
from jittor import nn

from . import passes_self_test, selected, source

# ------------------------------------------------------------------------------------------------ plain ops


def _column_mask(h: int) -> jt.Var:
    """(1, H, 1, H) additive mask: -inf where the column position i equals the row y of the pixel."""
    eye = jt.init.eye(h, dtype="float32")
    return jt.where(eye > 0, jt.float32(float("-inf")), jt.float32(0.0)).reshape(1, h, 1, h)


SOFTMAXES = ("pixel", "whole")  # over each pixel's H + W scores (the paper) | over the whole tensor (the seed)
log = logging.getLogger(__name__)


def criss_cross_affinity(query: jt.Var, key: jt.Var, softmax: str = "pixel") -> jt.Var:
    """Attention weights (B, H, W, H + W): column part first (i = 0..H-1), then the row (j = 0..W-1); softmax:
    one per pixel (sums to 1 over its H + W positions) or one over the whole tensor (sums to 1 over everything)."""
    b, cq, h, w = query.shape
    # column: for every x, (H_y x Cq) @ (Cq x H_i)
    e_h = nn.matmul(query.permute(0, 3, 2, 1), key.permute(0, 3, 1, 2))  # B, W, H_y, H_i
    e_h = e_h.permute(0, 2, 1, 3) + _column_mask(h)  # B, H_y, W, H_i
    # row: for every y, (W_x x Cq) @ (Cq x W_j)
    e_w = nn.matmul(query.permute(0, 2, 3, 1), key.permute(0, 2, 1, 3))  # B, H, W_x, W_j
    energies = jt.concat([e_h, e_w], dim=3)
    if softmax == "whole":  # jt.nn.softmax(x) without a dim reduces over every axis
        energies = energies - energies.max()
        weights = energies.exp()
        return weights / weights.sum()
    return nn.softmax(energies, dim=3)


def criss_cross_aggregate(attention: jt.Var, value: jt.Var) -> jt.Var:
    """Weighted sum of values along each pixel's row and column: (B, H, W, H+W), (B, C, H, W) -> (B, C, H, W)."""
    h = value.shape[2]
    a_h, a_w = attention[..., :h], attention[..., h:]
    # column: for every x, (C x H_i) @ (H_i x H_y)
    out_h = nn.matmul(value.permute(0, 3, 1, 2), a_h.permute(0, 2, 3, 1))  # B, W, C, H_y
    # row: for every y, (C x W_j) @ (W_j x W_x)
    out_w = nn.matmul(value.permute(0, 2, 1, 3), a_w.permute(0, 1, 3, 2))  # B, H, C, W_x
    return out_h.permute(0, 2, 3, 1) + out_w.permute(0, 2, 1, 3)


def criss_cross_attention_plain(query: jt.Var, key: jt.Var, value: jt.Var, softmax: str = "pixel") -> jt.Var:
    """(B, Cq, H, W), (B, Cq, H, W), (B, C, H, W) -> (B, C, H, W), without gamma and residual. Plain ops."""
    return criss_cross_aggregate(criss_cross_affinity(query, key, softmax), value)


# ------------------------------------------------------------------------------------------- fused kernels


def _on_gpu() -> bool:
    return bool(jt.flags.use_cuda)


def _check_shapes(query: jt.Var, key: jt.Var, value: jt.Var) -> None:
    if query.ndim != 4 or query.shape != key.shape:
        raise ValueError(f"query and key must be equal (B, Cq, H, W), got {query.shape} and {key.shape}")
    if value.ndim != 4 or value.shape[0] != query.shape[0] or value.shape[2:] != query.shape[2:]:
        raise ValueError(f"value must be (B, C, H, W) like query {query.shape}, got {value.shape}")


def _map_shape(x: jt.Var) -> list[int]:
    b, _, h, w = x.shape
    return [b, h + w, h, w]


def _code(shapes, dtypes, inputs, cpu_call: str, cuda_call: str) -> jt.Var:
    """One custom op, first output; SIZES in a call stands for B, D (the first input's channels), H, W."""
    sizes = "in0_shape0, in0_shape1, in0_shape2, in0_shape3"
    return jt.code(
        shapes,
        dtypes,
        inputs,
        cpu_header=source("cca_cpu.h"),
        cpu_src=cpu_call.replace("SIZES", sizes) + ";",
        cuda_header=source("cca_cuda.cuh"),
        cuda_src=cuda_call.replace("SIZES", sizes) + ";",
    )[0]


def attention(query: jt.Var, key: jt.Var) -> jt.Var:
    """The attention map (B, H + W, H, W) in the kernels' layout (chunked on the CPU, plain on the GPU)."""
    return _code(
        [_map_shape(query)],
        ["float32"],
        [query, key],
        "cca_cpu::affinity(in0_p, in1_p, out0_p, nullptr, SIZES)",
        "cca_cuda::attention(in0_p, in1_p, out0_p, SIZES)",
    )


def energy_grad(grad_out: jt.Var, value: jt.Var, attn: jt.Var) -> jt.Var:
    """dL/dE from dL/dout through the aggregation and the softmax, in the map layout of `attn`."""
    return _code(
        [_map_shape(grad_out)],
        ["float32"],
        [grad_out, value, attn],
        "cca_cpu::affinity(in0_p, in1_p, out0_p, in2_p, SIZES)",
        "cca_cuda::energy_grad(in0_p, in1_p, in2_p, out0_p, SIZES)",
    )


def aggregate(value: jt.Var, attn: jt.Var) -> jt.Var:
    """out[b, c, y, x] = sum over the criss-cross positions of attn * value."""
    return _code(
        [value.shape],
        [value.dtype],
        [value, attn],
        "cca_cpu::aggregate(in1_p, in0_p, out0_p, SIZES)",
        "cca_cuda::aggregate_op(in1_p, in0_p, out0_p, SIZES)",
    )


def aggregate_transposed(grad: jt.Var, attn: jt.Var) -> jt.Var:
    """The transpose of `aggregate` with respect to its value input."""
    b, _, h, w = grad.shape
    scratch = [[b, h, w, w]] if _on_gpu() else []  # GPU: the transposed row part of attn
    return _code(
        [grad.shape] + scratch,
        [grad.dtype] + ["float32"] * len(scratch),
        [grad, attn],
        "cca_cpu::aggregate_transposed(in1_p, in0_p, out0_p, SIZES)",
        "cca_cuda::aggregate_t_op(in1_p, in0_p, out0_p, out1_p, SIZES)",
    )


def attention_map(query: jt.Var, key: jt.Var) -> jt.Var:
    """Attention weights (B, H, W, H + W) like `cca.criss_cross_affinity`, from the fused kernel."""
    attn = attention(query, key)
    if not _on_gpu():  # undo the CPU layout: x chunks of (H + W, H, lanes) blocks, one after the other
        b, positions, h, w = attn.shape
        flat, blocks, x0 = attn.reshape(b, -1), [], 0
        for lanes in _chunk_lanes(w, _cpu_vector_width()):
            size = positions * h * lanes
            blocks.append(flat[:, positions * h * x0 : positions * h * x0 + size].reshape(b, positions, h, lanes))
            x0 += lanes
        attn = jt.concat(blocks, dim=3)
    return attn.permute(0, 2, 3, 1)


def _chunk_lanes(w: int, vector_width: int) -> list[int]:
    """The CPU kernels' x chunks (cca_cpu::Chunks): full vectors while they fit, then half, 4 and 1 lanes."""
    widths, lanes = (vector_width, max(vector_width // 2, 4), 4, 1), []
    while w > 0:
        lanes.append(next(n for n in widths if n <= w))
        w -= lanes[-1]
    return lanes


@functools.cache
def _cpu_vector_width() -> int:
    """Floats per vector register of the compiled CPU kernels (16 with AVX-512): it sets their chunks."""
    return int(jt.code([1], "int32", [], cpu_header=source("cca_cpu.h"), cpu_src="@out0(0) = cca_cpu::VW;").item())


class CrissCrossAttentionFunction(jt.Function):
    """The fused op with its hand-written backward; float32 in and out (float16 too on CUDA)."""

    def execute(self, query: jt.Var, key: jt.Var, value: jt.Var) -> jt.Var:
        attn = attention(query, key)
        self.saved = (query, key, value, attn)
        return aggregate(value, attn)

    def grad(self, grad_out: jt.Var):
        if grad_out is None:
            return None, None, None
        query, key, value, attn = self.saved
        grad_energy = energy_grad(grad_out, value, attn)
        return (
            aggregate(key, grad_energy),
            aggregate_transposed(query, grad_energy),
            aggregate_transposed(grad_out, attn),
        )


def _self_test(dtype: str) -> None:
    """Compile every kernel and compare with the plain float32 ops on a small problem (H != W, a tail chunk)."""
    rng = np.random.default_rng(0)
    shapes = [(2, 3, 5, 19)] * 2 + [(2, 4, 5, 19)] * 2
    with jt.enable_grad():  # inputs made under jt.no_grad() (first use in eval) would get all-zero grads
        q, k, v, weight = (jt.array(rng.standard_normal(s).astype(dtype).astype(np.float32)) for s in shapes)
        inputs = [q, k, v] if dtype == "float32" else [x.cast(dtype) for x in (q, k, v)]
        fused = CrissCrossAttentionFunction.apply(*inputs)
        fused = [fused] + jt.grad((fused.float32() * weight).sum(), inputs)
        plain = criss_cross_attention_plain(q, k, v)
        plain = [plain] + jt.grad((plain * weight).sum(), [q, k, v])
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, plain):
        if a.dtype != dtype:
            raise RuntimeError(f"{name} came out as {a.dtype}, expected {dtype}")
        a, b = a.float32().numpy(), b.numpy()
        if not np.abs(b).max() > 0.1:  # the plain ops' values are O(1): all zero means nothing was tested
            raise RuntimeError(f"{name} of the plain ops is all zero in the self-test")
        close = np.allclose(a, b, rtol=1e-4, atol=1e-5) if dtype == "float32" else np.allclose(a, b, 5e-3, 5e-3)
        if not close:
            raise RuntimeError(f"{name} differs from the plain ops by {np.abs(a - b).max():.3g} in {dtype}")


def _kernel_dtype(*xs: jt.Var) -> str:
    """float16 when all inputs are float16 on the GPU (the CUDA kernels take __half), else float32."""
    return "float16" if _on_gpu() and all(x.dtype == "float16" for x in xs) else "float32"


def fused_available(dtype: str = "float32") -> bool:
    """True when the fused kernels work on the current device for `dtype` (checked once per device and dtype)."""
    device = "cuda" if _on_gpu() else "cpu"
    what = f"fused criss-cross attention on {device} in {dtype}"
    return passes_self_test(("cca", device, dtype), lambda: _self_test(dtype), what)


def criss_cross_attention_fused(query: jt.Var, key: jt.Var, value: jt.Var) -> jt.Var:
    """(B, Cq, H, W), (B, Cq, H, W), (B, C, H, W) -> (B, C, H, W): `criss_cross_attention_plain` in fused kernels.

    float32 kernels on the CPU and the GPU; float16 kernels on the GPU when all three inputs are float16 (sums and
    the softmax in float32 there). Other dtypes are computed in float32 and cast back to value's dtype."""
    _check_shapes(query, key, value)
    dtype = _kernel_dtype(query, key, value)
    if not fused_available(dtype):
        return criss_cross_attention_plain(query, key, value)
    inputs = [x if x.dtype == dtype else x.cast(dtype) for x in (query, key, value)]
    out = CrissCrossAttentionFunction.apply(*inputs)
    return out if out.dtype == value.dtype else out.cast(value.dtype)


@functools.cache
def _whole_softmax_is_plain() -> None:
    log.info("model.cca_softmax=whole: the criss-cross attention runs on Jittor's ops (the fused kernels have a "
             "per-pixel softmax only)")  # fmt: skip


def criss_cross_attention(query: jt.Var, key: jt.Var, value: jt.Var, softmax: str = "pixel") -> jt.Var:
    """The criss-cross attention the models run: the fused kernels unless kernels.cca=jittor (then plain ops) or
    softmax="whole" (plain ops, said once in the log)."""
    if softmax == "whole":
        if selected("cca") == "fused":
            _whole_softmax_is_plain()
        return criss_cross_attention_plain(query, key, value, softmax)
    if selected("cca") == "fused":
        return criss_cross_attention_fused(query, key, value)
    return criss_cross_attention_plain(query, key, value)
