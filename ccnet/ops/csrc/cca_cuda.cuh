// Criss-cross attention, CUDA; compiled by Jittor's jt.code (ccnet/ops/cca.py).
// CUDA kernels: plain map layout, one thread per output element (see the comment below). Feature tensors (q, k, v
// and their grads) are float or __half (T); sums, the softmax and the attention map are float.

#include <cfloat>
#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

// Launch helper: kernels below use grid-stride loops, so any grid size covers all n items.
#ifndef CCA_LAUNCH
#define CCA_LAUNCH(kernel, n, ...) \
    kernel<<<(unsigned)((n) / 256 + 1 < 65536 ? (n) / 256 + 1 : 65536), 256>>>(__VA_ARGS__)
#endif

namespace cca_cuda {

// Maps (B, H + W, H, W) are plain on the GPU: element (b, k, y, x) at ((b * (H + W) + k) * H + y) * W + x,
// k < H the column position i, k = H + j the row position j. One thread per output element; neighbouring
// threads take neighbouring x, so loads along x coalesce and loads of a row position j are broadcasts.
#define CCA_FOR_EACH(t, n) \
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < (n); t += (long)gridDim.x * blockDim.x)

// Feature values in and out: float stays float, __half is widened on load and rounded once on store.
__device__ inline float load(float x) { return x; }
__device__ inline float load(__half x) { return __half2float(x); }
__device__ inline void store(float* p, float x) { *p = x; }
__device__ inline void store(__half* p, float x) { *p = __float2half(x); }

// E[b, i, y, x] = P(:, y, x) . Q(:, i, x), E[b, H + j, y, x] = P(:, y, x) . Q(:, y, j)
template <class T>
__global__ void energy(const T* __restrict__ p, const T* __restrict__ q, float* __restrict__ e, int batch, int d,
                       int h, int w) {
    const long hw = (long)h * w, positions = h + w;
    CCA_FOR_EACH(t, batch * positions * hw) {
        const int x = t % w, y = t / w % h, k = t / hw % positions;
        const long b = t / (hw * positions);
        const T* pp = p + b * d * hw + (long)y * w + x;
        const T* qq = q + b * d * hw + (k < h ? (long)k * w + x : (long)y * w + (k - h));
        float sum = 0.f;
        for (int c = 0; c < d; c++)
            sum += load(pp[c * hw]) * load(qq[c * hw]);
        e[t] = sum;
    }
}

// Softmax over the positions of each pixel, in place; the centre (column i == y) gets 0.
__global__ void softmax(float* __restrict__ e, int batch, int h, int w) {
    const long hw = (long)h * w, positions = h + w;
    CCA_FOR_EACH(t, batch * hw) {
        const int y = t % hw / w;
        float* ep = e + t / hw * positions * hw + t % hw;
        float mx = -FLT_MAX;
        for (int k = 0; k < positions; k++)
            if (k != y)
                mx = fmaxf(mx, ep[k * hw]);
        float sum = 0.f;
        for (int k = 0; k < positions; k++) {
            const float v = k == y ? 0.f : expf(ep[k * hw] - mx);
            ep[k * hw] = v;
            sum += v;
        }
        const float inv = 1.f / sum;
        for (int k = 0; k < positions; k++)
            ep[k * hw] *= inv;
    }
}

// Softmax backward in place: g holds dL/dA on entry and dL/dE = A * (dA - sum_k A dA) on exit.
__global__ void softmax_grad(const float* __restrict__ a, float* __restrict__ g, int batch, int h, int w) {
    const long hw = (long)h * w, positions = h + w;
    CCA_FOR_EACH(t, batch * hw) {
        const long base = t / hw * positions * hw + t % hw;
        float dot = 0.f;
        for (int k = 0; k < positions; k++)
            dot += a[base + k * hw] * g[base + k * hw];
        for (int k = 0; k < positions; k++)
            g[base + k * hw] = a[base + k * hw] * (g[base + k * hw] - dot);
    }
}

// out[b, c, y, x] = sum_i A[b, i, y, x] V[b, c, i, x] + sum_j A[b, H + j, y, x] V[b, c, y, j]
template <class T>
__global__ void aggregate(const float* __restrict__ a, const T* __restrict__ v, T* __restrict__ out, int batch,
                          int d, int h, int w) {
    const long hw = (long)h * w;
    CCA_FOR_EACH(t, batch * d * hw) {
        const int x = t % w, y = t / w % h;
        const long b = t / (d * hw);
        const float* ap = a + b * (h + w) * hw + (long)y * w + x;
        const T* vc = v + t / hw * hw;
        float sum = 0.f;
        for (int i = 0; i < h; i++)
            sum += ap[i * hw] * load(vc[(long)i * w + x]);
        for (int j = 0; j < w; j++)
            sum += ap[(h + j) * hw] * load(vc[(long)y * w + j]);
        store(out + t, sum);
    }
}

// a_t[b, y, x, j] = A[b, H + j, y, x]: the row part with j innermost, for coalesced loads in aggregate_t.
__global__ void transpose_rows(const float* __restrict__ a, float* __restrict__ a_t, int batch, int h,
                               int w) {
    const long hw = (long)h * w;
    CCA_FOR_EACH(t, batch * hw * w) {
        const int j = t % w, x = t / w % w, y = t / ((long)w * w) % h;
        const long b = t / (hw * w);
        a_t[t] = a[((b * (h + w) + h + j) * h + y) * w + x];
    }
}

// The transpose of aggregate: grad_v[b, c, p, q] = sum_y A[b, p, y, q] G[b, c, y, q]
//                                                + sum_x A[b, H + q, p, x] G[b, c, p, x]
template <class T>
__global__ void aggregate_t(const float* __restrict__ a, const float* __restrict__ a_t, const T* __restrict__ g,
                            T* __restrict__ grad_v, int batch, int d, int h, int w) {
    const long hw = (long)h * w;
    CCA_FOR_EACH(t, batch * d * hw) {
        const int q = t % w, p = t / w % h;
        const long b = t / (d * hw);
        const T* gc = g + t / hw * hw;
        const float* col = a + (b * (h + w) + p) * hw + q;       // A[b, p, y, q] at col[y * w]
        const float* row = a_t + (b * h + p) * (long)w * w + q;  // A[b, H + q, p, x] at row[x * w]
        float sum = 0.f;
        for (int y = 0; y < h; y++)
            sum += col[(long)y * w] * load(gc[(long)y * w + q]);
        for (int x = 0; x < w; x++)
            sum += row[(long)x * w] * load(gc[(long)p * w + x]);
        store(grad_v + t, sum);
    }
}

// Host side, one call per op (inputs and outputs are device pointers; T is float or __half).
template <class T>
inline void attention(const T* query, const T* key, float* attn, int batch, int d, int h, int w) {
    long n = (long)batch * (h + w) * h * w;
    CCA_LAUNCH(energy<T>, n, query, key, attn, batch, d, h, w);
    CCA_LAUNCH(softmax, (long)batch * h * w, attn, batch, h, w);
}

template <class T>
inline void energy_grad(const T* grad_out, const T* value, const float* attn, float* grad_e, int batch, int d,
                        int h, int w) {
    long n = (long)batch * (h + w) * h * w;
    CCA_LAUNCH(energy<T>, n, grad_out, value, grad_e, batch, d, h, w);
    CCA_LAUNCH(softmax_grad, (long)batch * h * w, attn, grad_e, batch, h, w);
}

template <class T>
inline void aggregate_op(const float* a, const T* v, T* out, int batch, int d, int h, int w) {
    CCA_LAUNCH(aggregate<T>, (long)batch * d * h * w, a, v, out, batch, d, h, w);
}

template <class T>
inline void aggregate_t_op(const float* a, const T* g, T* grad_v, float* a_t, int batch, int d, int h, int w) {
    CCA_LAUNCH(transpose_rows, (long)batch * h * w * w, a, a_t, batch, h, w);
    CCA_LAUNCH(aggregate_t<T>, (long)batch * d * h * w, a, a_t, g, grad_v, batch, d, h, w);
}

#undef CCA_FOR_EACH
}  // namespace cca_cuda
