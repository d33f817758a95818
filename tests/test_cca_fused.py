"""Fused criss-cross attention kernels against a NumPy float64 loop, the plain ops and finite differences."""

import shutil
import subprocess

import jittor as jt
import numpy as np
import pytest

from ccnet import ops
from ccnet.models.cca import CrissCrossAttention
from ccnet.ops.cca import (
    attention_map,
    criss_cross_affinity,
    criss_cross_attention,
    criss_cross_attention_fused,
    criss_cross_attention_plain,
    fused_available,
)

_CPU_SOURCE, _CUDA_SOURCE = ops.source("cca_cpu.h"), ops.source("cca_cuda.cuh")


def reference(q, k, v, mask_centre=True):
    """Per pixel: scores over its column and row, the column centre masked, one softmax, weighted sum."""
    out = np.zeros(v.shape, np.float64)
    _, _, h, w = q.shape
    for b, y, x in np.ndindex(q.shape[0], h, w):
        scores = np.concatenate([q[b, :, y, x] @ k[b, :, :, x], q[b, :, y, x] @ k[b, :, y, :]])
        if mask_centre:
            scores[y] = -np.inf
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[b, :, y, x] = v[b, :, :, x] @ weights[:h] + v[b, :, y, :] @ weights[h:]
    return out


def random_inputs(seed, b, cq, c, h, w):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in [(b, cq, h, w), (b, cq, h, w), (b, c, h, w)]]


def as_jt(*arrays):
    return [jt.array(a.astype(np.float32)) for a in arrays]


def grads(impl, q, k, v, weight):
    """Output and d(sum(out * weight))/d(q, k, v) of one implementation, as NumPy arrays."""
    jq, jk, jv = as_jt(q, k, v)
    out = impl(jq, jk, jv)
    return [t.numpy() for t in [out] + jt.grad((out * jt.array(weight.astype(np.float32))).sum(), [jq, jk, jv])]


def relative_error(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_selected_by_default_and_working(monkeypatch):
    assert fused_available() and ops.selected("cca") == "fused"
    calls = []
    monkeypatch.setattr(ops.cca, "criss_cross_attention_fused", lambda *a: calls.append("fused") or a[2])
    monkeypatch.setattr(ops.cca, "criss_cross_attention_plain", lambda *a: calls.append("plain") or a[2])
    q, k, v = as_jt(*random_inputs(0, 1, 2, 3, 4, 5))
    criss_cross_attention(q, k, v)
    with ops.using(cca="jittor"):
        criss_cross_attention(q, k, v)
    criss_cross_attention(q, k, v)
    assert calls == ["fused", "plain", "fused"]


# (B, Cq, C, H, W); widths 33 and 29 exercise the CPU kernels' tail chunks (16+16+1, 16+8+4+1 lanes)
SHAPES = [(1, 4, 6, 5, 7), (2, 3, 8, 9, 4), (2, 5, 7, 6, 33), (1, 2, 3, 17, 29), (3, 8, 16, 20, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_loop(shape):
    q, k, v = random_inputs(sum(shape), *shape)
    out = criss_cross_attention_fused(*as_jt(q, k, v)).numpy()
    assert out.shape == v.shape and out.dtype == np.float32
    assert relative_error(out, reference(q, k, v)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 4, 8, 7, 19), (1, 8, 64, 12, 12)])
def test_gradients_match_plain_ops(shape):
    q, k, v = random_inputs(7, *shape)
    weight = np.random.default_rng(8).standard_normal(v.shape)
    fused = grads(criss_cross_attention_fused, q, k, v, weight)
    plain = grads(criss_cross_attention_plain, q, k, v, weight)
    for name, a, b in zip(["out", "dq", "dk", "dv"], fused, plain):
        assert relative_error(a, b) < 1e-5, name


def test_gradients_match_finite_differences():
    q, k, v = random_inputs(3, 1, 2, 3, 3, 5)
    weight = np.random.default_rng(9).standard_normal(v.shape)  # a random linear read-out of the output
    analytic = grads(criss_cross_attention_fused, q, k, v, weight)[1:]
    eps = 1e-6
    for which, grad in enumerate(analytic):
        numeric = np.zeros_like(grad, dtype=np.float64)
        for idx in np.ndindex(*grad.shape):
            args_plus, args_minus = [q.copy(), k.copy(), v.copy()], [q.copy(), k.copy(), v.copy()]
            args_plus[which][idx] += eps
            args_minus[which][idx] -= eps
            loss_plus = (reference(*args_plus) * weight).sum()
            loss_minus = (reference(*args_minus) * weight).sum()
            numeric[idx] = (loss_plus - loss_minus) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_centre_is_masked_and_counted_once():
    q, k, v = random_inputs(4, 2, 3, 4, 6, 21)
    weights = attention_map(*as_jt(q, k)).numpy()
    assert weights.shape == (2, 6, 21, 6 + 21)
    for y in range(6):  # the column weight at i == y is exactly 0: the centre counts in the row branch only
        assert np.all(weights[:, y, :, y] == 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(weights, criss_cross_affinity(*as_jt(q, k)).numpy(), rtol=1e-5, atol=1e-7)
    out = criss_cross_attention_fused(*as_jt(q, k, v)).numpy()
    assert relative_error(out, reference(q, k, v)) < 1e-5
    assert relative_error(out, reference(q, k, v, mask_centre=False)) > 1e-3  # counting it twice differs


def test_module_with_fused_kernels_matches_plain_ops():
    x = jt.array(np.random.default_rng(5).standard_normal((2, 16, 7, 9)).astype(np.float32))
    module = CrissCrossAttention(16)
    module.gamma.assign(jt.array([0.5]))
    fused = module(x).numpy()
    with ops.using(cca="jittor"):
        plain = module(x).numpy()
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-5), ("float16", 2e-3)])
def test_other_dtypes_keep_their_dtype(dtype, tolerance):
    # On the CPU the kernels are float32: float64 and float16 inputs are cast in, and the output cast back.
    q, k, v = (a.astype(dtype).astype(np.float64) for a in random_inputs(6, 1, 2, 3, 4, 5))
    out = criss_cross_attention_fused(*(x.cast(dtype) for x in as_jt(q, k, v)))  # jt.array makes float64 float32
    assert out.dtype == dtype
    assert relative_error(out.numpy().astype(np.float64), reference(q, k, v)) < tolerance


def test_shape_errors():
    q, k, v = as_jt(*random_inputs(0, 1, 2, 3, 4, 5))
    with pytest.raises(ValueError):
        criss_cross_attention_fused(q, k[:, :1], v)
    with pytest.raises(ValueError):
        criss_cross_attention_fused(q, k, v[:, :, :3])


# The CUDA kernels use grid-stride loops and no shared memory, so one host "thread" running each kernel over
# the whole grid computes what the GPU computes: this checks their indexing without a GPU. FEATURE is the
# feature type the kernels are instantiated with: float, or GCC's _Float16 standing in for CUDA's __half.
CUDA_EMULATION_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
struct Dim3 { unsigned x; };
static Dim3 threadIdx{0}, blockIdx{0}, blockDim{1}, gridDim{1};
#define __global__
#define __device__
typedef _Float16 __half;
inline float __half2float(__half x) { return (float)x; }
inline __half __float2half(float x) { return (__half)x; }
#define CCA_LAUNCH(kernel, n, ...) ((void)(n), kernel(__VA_ARGS__))
#include "cca_cuda.cuh"

static std::vector<FEATURE> read(const char* path, size_t n) {
    std::vector<float> data(n);
    FILE* f = fopen(path, "rb");
    if (!f || fread(data.data(), sizeof(float), n, f) != n) exit(1);
    fclose(f);
    return std::vector<FEATURE>(data.begin(), data.end());
}
static void write(const char* path, const std::vector<FEATURE>& data) {
    std::vector<float> as_float(data.begin(), data.end());
    FILE* f = fopen(path, "wb");
    fwrite(as_float.data(), sizeof(float), as_float.size(), f);
    fclose(f);
}
int main(int argc, char** argv) {
    int b = atoi(argv[1]), cq = atoi(argv[2]), c = atoi(argv[3]), h = atoi(argv[4]), w = atoi(argv[5]);
    size_t hw = (size_t)h * w, map = (size_t)b * (h + w) * hw;
    auto q = read("q.bin", b * cq * hw), k = read("k.bin", b * cq * hw);
    auto v = read("v.bin", b * c * hw), g = read("g.bin", b * c * hw);
    std::vector<float> attn(map), grad_e(map), scratch(b * hw * w);
    std::vector<FEATURE> out(v.size()), dq(q.size()), dk(k.size()), dv(v.size());
    cca_cuda::attention(q.data(), k.data(), attn.data(), b, cq, h, w);
    cca_cuda::aggregate_op(attn.data(), v.data(), out.data(), b, c, h, w);
    cca_cuda::energy_grad(g.data(), v.data(), attn.data(), grad_e.data(), b, c, h, w);
    cca_cuda::aggregate_op(grad_e.data(), k.data(), dq.data(), b, cq, h, w);
    cca_cuda::aggregate_t_op(grad_e.data(), q.data(), dk.data(), scratch.data(), b, cq, h, w);
    cca_cuda::aggregate_t_op(attn.data(), g.data(), dv.data(), scratch.data(), b, c, h, w);
    write("out.bin", out), write("dq.bin", dq), write("dk.bin", dk), write("dv.bin", dv);
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize(("feature", "tolerance"), [("float", 1e-5), ("_Float16", 2e-3)])
def test_cuda_kernels_emulated_on_cpu(tmp_path, feature, tolerance):
    # _Float16 inputs are rounded to half before the reference sees them; the kernels then round each output
    # once (2^-11 relative), so half is held to 2e-3 of the largest value, float32 to 1e-5.
    shape = (2, 3, 5, 6, 11)
    q, k, v = random_inputs(11, *shape)
    weight = np.random.default_rng(12).standard_normal(v.shape)
    if feature == "_Float16":
        q, k, v, weight = (x.astype(np.float16).astype(np.float64) for x in (q, k, v, weight))
    (tmp_path / "cca_cuda.cuh").write_text(_CUDA_SOURCE)
    (tmp_path / "driver.cc").write_text(CUDA_EMULATION_DRIVER)
    compile_driver = ["g++", "-std=c++17", "-O1", f"-DFEATURE={feature}", "driver.cc", "-o", "driver"]
    subprocess.run(compile_driver, cwd=tmp_path, check=True)
    for name, array in zip(["q", "k", "v", "g"], [q, k, v, weight]):
        array.astype(np.float32).tofile(tmp_path / f"{name}.bin")
    subprocess.run(["./driver", *map(str, shape)], cwd=tmp_path, check=True)
    emulated = [np.fromfile(tmp_path / f"{name}.bin", np.float32) for name in ["out", "dq", "dk", "dv"]]
    expected = grads(criss_cross_attention_plain, q, k, v, weight)
    for name, a, b in zip(["out", "dq", "dk", "dv"], emulated, expected):
        error = relative_error(a.reshape(b.shape), b)
        assert error < tolerance, (name, error)
        if feature == "_Float16":  # really rounded to half, not float32 passed through
            assert 1e-5 < error, (name, error)


# Device code is only compiled by nvcc: a CUDA-only mistake (a host function called on the device, a __half
# overload missing) passes the emulation above but fails here. Both feature types, every host entry point.
NVCC_DRIVER = r"""
#include "cca_cuda.cuh"
template <class T>
void every_op(const T* f, T* out, float* map, float* scratch) {
    cca_cuda::attention(f, f, map, 1, 2, 3, 4);
    cca_cuda::energy_grad(f, f, map, map, 1, 2, 3, 4);
    cca_cuda::aggregate_op(map, f, out, 1, 2, 3, 4);
    cca_cuda::aggregate_t_op(map, f, out, scratch, 1, 2, 3, 4);
}
template void every_op<float>(const float*, float*, float*, float*);
template void every_op<__half>(const __half*, __half*, float*, float*);
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit; no GPU needed)")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    (tmp_path / "cca_cuda.cuh").write_text(_CUDA_SOURCE)
    (tmp_path / "driver.cu").write_text(NVCC_DRIVER)
    command = ["nvcc", "-c", "-arch=sm_80", "-Werror", "all-warnings", "driver.cu", "-o", "driver.o"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# The CPU kernels compiled as plain C++ with AddressSanitizer, on the benchmark's shapes and awkward ones:
# any read or write outside the exact-size buffers (inputs, maps, outputs, per-thread scratch) aborts it.
ASAN_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "cca_cpu.h"
int main(int argc, char** argv) {
    int b = atoi(argv[1]), cq = atoi(argv[2]), c = atoi(argv[3]), h = atoi(argv[4]), w = atoi(argv[5]);
    size_t hw = (size_t)h * w, map = (size_t)b * (h + w) * hw;
    std::mt19937 gen(0);
    std::normal_distribution<float> normal;
    auto random = [&](size_t n) { std::vector<float> v(n); for (auto& x : v) x = normal(gen); return v; };
    auto q = random(b * cq * hw), k = random(b * cq * hw), v = random(b * c * hw), g = random(b * c * hw);
    std::vector<float> attn(map), grad_e(map), out(v.size()), dq(q.size()), dk(k.size()), dv(v.size());
    cca_cpu::affinity(q.data(), k.data(), attn.data(), nullptr, b, cq, h, w);
    cca_cpu::aggregate(attn.data(), v.data(), out.data(), b, c, h, w);
    cca_cpu::affinity(g.data(), v.data(), grad_e.data(), attn.data(), b, c, h, w);
    cca_cpu::aggregate(grad_e.data(), k.data(), dq.data(), b, cq, h, w);
    cca_cpu::aggregate_transposed(grad_e.data(), q.data(), dk.data(), b, cq, h, w);
    cca_cpu::aggregate_transposed(attn.data(), g.data(), dv.data(), b, c, h, w);
    double sum = 0;
    for (float x : attn) sum += x;
    printf("%.6f\n", sum / hw / b);  // every pixel's attention sums to 1
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpu_kernels_stay_inside_their_buffers(tmp_path):
    (tmp_path / "cca_cpu.h").write_text(_CPU_SOURCE)
    (tmp_path / "driver.cc").write_text(ASAN_DRIVER)
    flags = ["-std=c++17", "-O1", "-g", "-fopenmp", "-march=native", "-fsanitize=address", "-fno-omit-frame-pointer"]
    built = subprocess.run(["g++", *flags, "driver.cc", "-o", "driver"], cwd=tmp_path, capture_output=True, text=True)
    if built.returncode and "asan" in built.stderr.lower():
        pytest.skip("g++ has no AddressSanitizer runtime here")
    assert built.returncode == 0, built.stderr
    env = {"OMP_NUM_THREADS": "2", "ASAN_OPTIONS": "detect_leaks=0", "PATH": "/usr/bin:/bin"}
    for shape in [(1, 64, 512, 64, 64), (2, 64, 512, 33, 97), (1, 3, 5, 7, 11), (2, 5, 9, 13, 29), (1, 8, 16, 1, 17)]:
        run = subprocess.run(["./driver", *map(str, shape)], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert run.returncode == 0, f"{shape}: {run.stderr[-3000:]}"
        assert abs(float(run.stdout) - 1.0) < 1e-4, shape


@pytest.mark.parametrize("wrong", [0, 1, 2])
def test_self_test_checks_the_backward_under_no_grad(monkeypatch, wrong):
    """First use is often in eval (jt.no_grad()): the self-test must still compare real gradients."""
    from ccnet.ops import cca as cca_ops

    real = cca_ops.CrissCrossAttentionFunction.grad

    def one_grad_off(self, grad_out):
        grads = list(real(self, grad_out))
        grads[wrong] = grads[wrong] * 1.1
        return tuple(grads)

    with jt.no_grad():
        cca_ops._self_test("float32")  # the real kernels pass
        monkeypatch.setattr(cca_ops.CrissCrossAttentionFunction, "grad", one_grad_off)
        with pytest.raises(RuntimeError, match=f"{'dq dk dv'.split()[wrong]} differs from the plain ops"):
            cca_ops._self_test("float32")
