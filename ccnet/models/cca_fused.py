"""Fused criss-cross attention: custom Jittor ops (C++/OpenMP on the CPU, CUDA on the GPU).

Same maths as `ccnet.models.cca.criss_cross_attention`, in three kernels instead of ~20 Jittor ops:
`attention` (energies of the H + W - 1 criss-cross positions and the masked softmax), `aggregate` (the
weighted sum of values) and `aggregate_transposed` (its transpose, for the backward pass). The largest
buffer is the (B, H + W, H, W) attention map, saved for the backward pass; nothing of size (HW)^2 exists.

Backward: with A = softmax(E) and out = agg(A, v),
  dA = energies(grad_out, v), dE = A * (dA - sum_k A dA)   (the same kernel as the forward energies)
  dq = agg(dE, k), dk = agg_t(dE, q), dv = agg_t(A, grad_out).

The kernels compile on first use (cached by Jittor afterwards). If they fail to compile or disagree with the
plain ops on a small self-test, `criss_cross_attention_fused` warns once and runs the plain ops instead.
"""

from __future__ import annotations

import functools

import jittor as jt
import numpy as np

from .cca import CCA_IMPLS, criss_cross_attention
from .fallback import passes_self_test

# CPU kernels. The (B, H + W, H, W) maps are stored in x chunks of one vector register there (see the comment
# below), so only these kernels can read them; `attention_map` converts one to the usual layout.
_CPU_SOURCE = r"""
#include <algorithm>
#include <type_traits>
#include <vector>

namespace cca_cpu {

// Every kernel vectorises over x, the contiguous axis of NCHW tensors, in chunks of L lanes: VW (a vector
// register: 16 floats with AVX-512, 8 with AVX), then halves down to 4, then 1 for the tail. The
// (B, H + W, H, W) maps (energies, attention and their grads) are stored chunk by chunk so that each vector
// is contiguous and aligned: the chunk [x0, x0 + L) of batch item b is a block of (H + W) x H x L floats at
// b * (H + W) * H * W + (H + W) * H * x0, element (k, y, x) at (k * H + y) * L + x - x0. k < H is the column
// position i, k = H + j the row position j.
// VW: floats per vector register; ACC: accumulator registers per tile (AVX-512 has 32 registers, else 16).
#if defined(__AVX512F__)
constexpr int VW = 16, ACC = 24;
#elif defined(__AVX__)
constexpr int VW = 8, ACC = 12;
#else
constexpr int VW = 4, ACC = 12;
#endif
constexpr int HALF_VW = VW / 2 >= 4 ? VW / 2 : 4;

template <int L>
struct Vec {
    typedef float type __attribute__((vector_size(4 * L)));
    typedef float unaligned __attribute__((vector_size(4 * L), aligned(4)));
    typedef int itype __attribute__((vector_size(4 * L)));
};

template <int L>
inline typename Vec<L>::type vload(const float* p) {
    return *reinterpret_cast<const typename Vec<L>::unaligned*>(p);
}
template <int L>
inline void vstore(float* p, typename Vec<L>::type v) {
    *reinterpret_cast<typename Vec<L>::unaligned*>(p) = v;
}

template <int L>
inline typename Vec<L>::type vsplat(float s) {
    return typename Vec<L>::type{} + s;
}

// exp(x) for x <= 0 (softmax after the max is subtracted): 2^n * p(r), Cephes' expf polynomial.
template <int L>
inline typename Vec<L>::type vexp_nonpositive(typename Vec<L>::type x) {
    typedef typename Vec<L>::type vf;
    typedef typename Vec<L>::itype vi;
    x = x > -87.f ? x : vsplat<L>(-87.f);
    vi n = __builtin_convertvector(x * 1.44269504f - 0.5f, vi);  // round(x / ln 2) for x <= 0
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    return p * reinterpret_cast<vf>((n + 127) << 23);
}

// x chunks: [x0, x0 + lanes) with VW lanes, then VW / 2, 4 and 1 for the tail.
struct Chunks {
    std::vector<int> x0, lanes;
    explicit Chunks(int w) {
        for (int x = 0; x < w;) {
            int left = w - x, l = left >= VW ? VW : left >= HALF_VW ? HALF_VW : left >= 4 ? 4 : 1;
            x0.push_back(x);
            lanes.push_back(l);
            x += l;
        }
    }
    int size() const { return (int)x0.size(); }
};

// Run f(std::integral_constant<int, L>) with the compile-time lane count L == lanes.
template <class F>
inline void with_lanes(int lanes, F&& f) {
    if (lanes == VW)
        f(std::integral_constant<int, VW>());
    else if (lanes == HALF_VW)
        f(std::integral_constant<int, HALF_VW>());
    else if (lanes == 4)
        f(std::integral_constant<int, 4>());
    else
        f(std::integral_constant<int, 1>());
}

// Copy rows x cols vectors of L lanes into a packed buffer laid out [row][col][lane]; rs and cs are the
// row and column strides (in floats) of the source.
template <int L>
inline void pack(const float* t, long rs, long cs, int rows, int cols, float* out) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            vstore<L>(out + ((long)r * cols + c) * L, vload<L>(t + r * rs + c * cs));
}

// One register tile of a per-lane GEMM: for every lane, Z[m, n] (+)= sum_r Lhs[m, r] * Rhs[r, n]. Operands
// are given by strides in floats. Rows past mr / columns past nr repeat the last valid one (cheap edge
// handling) and are not stored.
template <int L, int MR, int NR>
inline void lane_tile(const float* lhs, long lsm, long lsr, const float* rhs, long rsr, long rsn, float* z,
                      long zsm, long zsn, int kr, int mr, int nr, bool accumulate) {
    typedef typename Vec<L>::type vf;
    long loff[MR], roff[NR];
    for (int m = 0; m < MR; m++)
        loff[m] = std::min(m, mr - 1) * lsm;
    for (int n = 0; n < NR; n++)
        roff[n] = std::min(n, nr - 1) * rsn;
    vf acc[MR][NR];
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            acc[m][n] = accumulate ? vload<L>(z + std::min(m, mr - 1) * zsm + std::min(n, nr - 1) * zsn)
                                   : vsplat<L>(0.f);
    for (int k = 0; k < kr; k++) {
        vf a[MR];
        for (int m = 0; m < MR; m++)
            a[m] = vload<L>(lhs + loff[m] + k * lsr);
        for (int n = 0; n < NR; n++) {
            vf b = vload<L>(rhs + k * rsr + roff[n]);
            for (int m = 0; m < MR; m++)
                acc[m][n] += a[m] * b;
        }
    }
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++)
            vstore<L>(z + m * zsm + n * zsn, acc[m][n]);
}

constexpr int LANE_MR = ACC / 4, LANE_NR = 4;  // lane GEMM tile; Lhs packed, Rhs streamed

// One register tile of a broadcast GEMM: Z[m, x] (+)= sum_r S[m, r] * R[r, x] for MR rows and NV vectors of
// L lanes; vector v starts at roff[v] in R's rows and at zoff[v] in Z's rows.
template <int L, int MR, int NV>
inline void bcast_tile(const float* s, long ssm, long ssr, const float* r, long rsr, const long* roff,
                       float* z, long zsm, const long* zoff, int kr, int mr, bool accumulate) {
    typedef typename Vec<L>::type vf;
    long soff[MR], ro[NV];
    for (int m = 0; m < MR; m++)
        soff[m] = std::min(m, mr - 1) * ssm;
    for (int v = 0; v < NV; v++)
        ro[v] = roff[v];
    vf acc[MR][NV];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++)
            acc[m][v] = accumulate ? vload<L>(z + std::min(m, mr - 1) * zsm + zoff[v]) : vsplat<L>(0.f);
    for (int k = 0; k < kr; k++) {
        vf b[NV];
        for (int v = 0; v < NV; v++)
            b[v] = vload<L>(r + k * rsr + ro[v]);
        for (int m = 0; m < MR; m++) {
            float a = s[soff[m] + k * ssr];
            for (int v = 0; v < NV; v++)
                acc[m][v] += a * b[v];
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < NV; v++)
            vstore<L>(z + m * zsm + zoff[v], acc[m][v]);
}

// All row tiles of a broadcast GEMM for one group of x chunks.
template <int L, int MR, int NV>
inline void bcast_rows(const float* s, long ssm, long ssr, const float* r, long rsr, const long* roff,
                       float* z, long zsm, const long* zoff, int m_size, int k_size, bool accumulate) {
    for (int m = 0; m < m_size; m += MR) {
        if (ssr == 1 && m + 2 * MR <= m_size)  // rows of the tile after next: hide their cache misses
            for (int p = m + MR; p < m + 2 * MR; p++) {
                for (int o = 0; o < k_size; o += 16)  // one cache line per 16 floats
                    __builtin_prefetch(s + p * ssm + o);
                for (int v = 0; v < NV; v++)
                    __builtin_prefetch(z + p * zsm + zoff[v], 1);
            }
        bcast_tile<L, MR, NV>(s + m * ssm, ssm, ssr, r, rsr, roff, z + m * zsm, zsm, zoff, k_size,
                              std::min(MR, m_size - m), accumulate);
    }
}

// Where each x chunk of an output row starts and how far apart its rows are (in floats).
struct Rows {
    std::vector<float*> start;
    std::vector<long> stride;
};

// An NCHW tensor: chunk c of row r at t + r * row_stride + x0[c].
inline Rows plain_rows(float* t, long row_stride, const Chunks& ch) {
    Rows rows;
    for (int c = 0; c < ch.size(); c++)
        rows.start.push_back(t + ch.x0[c]), rows.stride.push_back(row_stride);
    return rows;
}

// A chunked map (of one batch item) from position k0 on, for the image row y.
inline Rows map_rows(float* map, int h, int w, int k0, int y, const Chunks& ch) {
    Rows rows;
    for (int c = 0; c < ch.size(); c++) {
        long l = ch.lanes[c];
        rows.start.push_back(map + (long)(h + w) * h * ch.x0[c] + ((long)k0 * h + y) * l);
        rows.stride.push_back(h * l);
    }
    return rows;
}

constexpr int NV_MAX = ACC / 4;  // vectors per broadcast tile

// Rows per broadcast tile of nv vectors: about ACC accumulators.
constexpr int bcast_mr(int nv) {
    return std::max(2, std::min(8, ACC / nv));
}

// bcast_gemm for a one-lane chunk: Z[m] (+)= sum_r S[m, r] R[r]. Vectorising over the single lane would waste
// the others, so this vectorises over r (S rows contiguous: dot products, 4 at a time) or over m (S columns
// contiguous: the transposed broadcast form).
inline void one_lane_gemm(const float* s, long ssm, long ssr, const float* r, long rs, float* z, long zsm,
                          int m_size, int k_size, bool accumulate) {
    typedef Vec<VW>::type vf;
    static thread_local std::vector<float> column, result;
    column.resize(k_size);
    for (int k = 0; k < k_size; k++)
        column[k] = r[k * rs];
    const int k_full = k_size / VW * VW;
    if (ssr == 1) {
        for (int m0 = 0; m0 < m_size; m0 += 4) {
            vf acc[4] = {};
            float sum[4] = {};
            const int mr = std::min(4, m_size - m0);
            for (int m = 0; m < mr; m++) {
                const float* sm = s + (m0 + m) * ssm;
                for (int k = 0; k < k_full; k += VW)
                    acc[m] += vload<VW>(sm + k) * vload<VW>(column.data() + k);
                for (int k = k_full; k < k_size; k++)
                    sum[m] += sm[k] * column[k];
            }
            for (int m = 0; m < mr; m++) {
                for (int l = 0; l < VW; l++)
                    sum[m] += acc[m][l];
                float& out = z[(m0 + m) * zsm];
                out = accumulate ? out + sum[m] : sum[m];
            }
        }
        return;
    }
    // ssm == 1: Z[m..m+VW) = sum_r S[m..m+VW, r] R[r]
    result.assign(m_size, 0.f);
    const int m_full = m_size / VW * VW;
    for (int m0 = 0; m0 < m_full; m0 += VW * 4) {
        vf acc[4] = {};
        const int vectors = std::min(4, (m_full - m0) / VW);
        for (int k = 0; k < k_size; k++)
            for (int v = 0; v < vectors; v++)
                acc[v] += vload<VW>(s + m0 + VW * v + k * ssr) * column[k];
        for (int v = 0; v < vectors; v++)
            vstore<VW>(result.data() + m0 + VW * v, acc[v]);
    }
    for (int m = m_full; m < m_size; m++)
        for (int k = 0; k < k_size; k++)
            result[m] += s[m + k * ssr] * column[k];
    for (int m = 0; m < m_size; m++)
        z[m * zsm] = accumulate ? z[m * zsm] + result[m] : result[m];
}

// Z[m, x] (+)= sum_r S[m, r] * R[r, x] for m < m_size, r < k_size, over all x chunks. R is packed (row r at
// r * rs, aligned when rs is a multiple of VW); Z is given by its chunk starts.
inline void bcast_gemm(const float* s, long ssm, long ssr, const float* r, long rs, const Rows& z,
                       const Chunks& ch, int m_size, int k_size, bool accumulate) {
    for (int c = 0; c < ch.size();) {
        int nv = 1;  // a group of up to NV_MAX full chunks: their row strides agree
        if (ch.lanes[c] == VW)
            while (nv < NV_MAX && c + nv < ch.size() && ch.lanes[c + nv] == VW)
                nv++;
        long roff[NV_MAX], zoff[NV_MAX];
        for (int v = 0; v < nv; v++)
            roff[v] = ch.x0[c + v] - ch.x0[c], zoff[v] = z.start[c + v] - z.start[c];
        auto rows = [&](auto lanes, auto mr, auto vectors) {
            bcast_rows<decltype(lanes)::value, decltype(mr)::value, decltype(vectors)::value>(
                s, ssm, ssr, r + ch.x0[c], rs, roff, z.start[c], z.stride[c], zoff, m_size, k_size,
                accumulate);
        };
        if (ch.lanes[c] == 1 && (ssr == 1 || ssm == 1)) {
            one_lane_gemm(s, ssm, ssr, r + ch.x0[c], rs, z.start[c], z.stride[c], m_size, k_size, accumulate);
            c += 1;
            continue;
        }
        typedef std::integral_constant<int, VW> LV;
        typedef std::integral_constant<int, 1> V1;
        if (ch.lanes[c] == VW) {
            switch (nv) {
                case 6:
                    rows(LV(), std::integral_constant<int, bcast_mr(6)>(), std::integral_constant<int, 6>());
                    break;
                case 5:
                    rows(LV(), std::integral_constant<int, bcast_mr(5)>(), std::integral_constant<int, 5>());
                    break;
                case 4:
                    rows(LV(), std::integral_constant<int, bcast_mr(4)>(), std::integral_constant<int, 4>());
                    break;
                case 3:
                    rows(LV(), std::integral_constant<int, bcast_mr(3)>(), std::integral_constant<int, 3>());
                    break;
                case 2:
                    rows(LV(), std::integral_constant<int, bcast_mr(2)>(), std::integral_constant<int, 2>());
                    break;
                default: rows(LV(), std::integral_constant<int, bcast_mr(1)>(), V1()); break;
            }
        } else {
            with_lanes(ch.lanes[c], [&](auto lanes) { rows(lanes, std::integral_constant<int, 8>(), V1()); });
        }
        c += nv;
    }
}

// buf[r][x] = t[r * row_stride + x] for r < rows, x < w; buf rows are wp apart.
inline void pack_rows(const float* t, long row_stride, int rows, int w, long wp, float* buf) {
    for (int r = 0; r < rows; r++)
        std::copy(t + r * row_stride, t + r * row_stride + w, buf + r * wp);
}

// buf[r][c] = t[r * rs + c * cs] for r < rows, c < cols; buf rows are stride apart.
inline void pack_rows_strided(const float* t, long rs, long cs, int rows, int cols, long stride, float* buf) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            buf[r * stride + c] = t[r * rs + c * cs];
}

// t[r * rs + c * cs] = buf[r][c]: the inverse of pack_rows_strided.
inline void scatter_column(const float* buf, long stride, int rows, int cols, float* t, long rs, long cs) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            t[r * rs + c * cs] = buf[r * stride + c];
}

// The row part of a chunked map for image row y: A[H + j, y, x] to buf[j][x] or, transposed, to buf[x][j].
inline void pack_map_row_part(const float* map, int h, int w, int y, const Chunks& ch, long wp,
                              bool transpose, float* buf) {
    for (int c = 0; c < ch.size(); c++) {
        const int l = ch.lanes[c], x0 = ch.x0[c];
        const float* src = map + (long)(h + w) * h * x0 + ((long)h * h + y) * l;
        for (int j = 0; j < w; j++)
            for (int i = 0; i < l; i++) {
                float value = src[(long)j * h * l + i];
                if (transpose)
                    buf[(x0 + i) * wp + j] = value;
                else
                    buf[j * wp + x0 + i] = value;
            }
    }
}

// Softmax over the H + W positions of pixel (y, x) for L lanes; the centre (column i == y) gets 0.
// e points at the pixel's first position, positions are `stride` apart.
template <int L>
inline void softmax_lanes(float* e, long stride, int positions, int centre) {
    typedef typename Vec<L>::type vf;
    vf mx = vsplat<L>(-3.0e38f);
    for (int k = 0; k < positions; k++)
        if (k != centre) {
            vf v = vload<L>(e + k * stride);
            mx = v > mx ? v : mx;
        }
    vf sum = vsplat<L>(0.f);
    for (int k = 0; k < positions; k++) {
        vf p = k == centre ? vsplat<L>(0.f) : vexp_nonpositive<L>(vload<L>(e + k * stride) - mx);
        vstore<L>(e + k * stride, p);
        sum += p;
    }
    vf inv = 1.f / sum;
    for (int k = 0; k < positions; k++)
        vstore<L>(e + k * stride, vload<L>(e + k * stride) * inv);
}

// Softmax backward in place: g holds dL/dA on entry and dL/dE = A * (dA - sum_k A dA) on exit.
template <int L>
inline void softmax_grad_lanes(const float* a, float* g, long stride, int positions) {
    typedef typename Vec<L>::type vf;
    vf dot = vsplat<L>(0.f);
    for (int k = 0; k < positions; k++)
        dot += vload<L>(a + k * stride) * vload<L>(g + k * stride);
    for (int k = 0; k < positions; k++)
        vstore<L>(g + k * stride, vload<L>(a + k * stride) * (vload<L>(g + k * stride) - dot));
}

constexpr int K_BLOCK = 32;  // channels per step of the column energies: packed keys stay in L2

// Channels per task of the aggregations: about 64, at least two tasks, whole register tiles.
inline int channel_block(int d) {
    return std::min(66, ((d + 1) / 2 + LANE_MR - 1) / LANE_MR * LANE_MR);
}

// Energies of the criss-cross positions, P and Q of shape (B, D, H, W), E a chunked map:
// E[i, y, x] = P(:, y, x) . Q(:, i, x) and E[H + j, y, x] = P(:, y, x) . Q(:, y, j).
// Then, with attn null, the masked softmax in place (forward: P = query, Q = key -> attention); otherwise
// the softmax backward with those probabilities (backward: P = grad of out, Q = value -> grad of energies).
inline void affinity(const float* p, const float* q, float* e, const float* attn, int batch, int d, int h,
                     int w) {
    const long hw = (long)h * w, bpq = d * hw, be = (long)(h + w) * hw;
    const Chunks ch(w);
    const long wp = (w + 15) / 16 * 16, hp = (h + 15) / 16 * 16;
    const Chunks ch_y(h);
    const int y_blocks = 2;
#pragma omp parallel
    {
        std::vector<float> q_pack((size_t)K_BLOCK * h * VW), p_pack((size_t)K_BLOCK * LANE_MR * VW);
        std::vector<float> p_rows((size_t)d * wp), q_rows((size_t)d * wp), column((size_t)d * hp);
        // column: per lane, E[i, y] = sum_c P[c, y] Q[c, i]
#pragma omp for collapse(3) schedule(dynamic)
        for (int b = 0; b < batch; b++)
            for (int c = 0; c < ch.size(); c++)
                for (int yb = 0; yb < y_blocks; yb++)
                    with_lanes(ch.lanes[c], [&](auto lanes) {
                        constexpr int L = decltype(lanes)::value;
                        const int y0 = h * yb / y_blocks, y1 = h * (yb + 1) / y_blocks;
                        const float* pb = p + b * bpq + ch.x0[c];
                        const float* qb = q + b * bpq + ch.x0[c];
                        float* eb = e + b * be + (h + w) * (long)h * ch.x0[c];
                        if (L == 1) {  // one column: E[i, y] = sum_c Q[c, i] P[c, y], vectorised over y
                            if (yb == 0) {
                                pack_rows_strided(pb, hw, w, d, h, hp, column.data());  // [c][y]
                                bcast_gemm(qb, w, hw, column.data(), hp, plain_rows(eb, h, ch_y), ch_y, h, d,
                                           false);
                            }
                            return;
                        }
                        for (int c0 = 0; c0 < d; c0 += K_BLOCK) {
                            int kr = std::min(K_BLOCK, d - c0);
                            pack<L>(qb + c0 * hw, hw, w, kr, h, q_pack.data());  // [c][i][lane]
                            for (int y = y0; y < y1; y += LANE_MR) {
                                int mr = std::min(LANE_MR, y1 - y);
                                pack<L>(pb + c0 * hw + y * w, hw, w, kr, mr, p_pack.data());  // [c][y][lane]
                                for (int i = 0; i < h; i += LANE_NR)
                                    lane_tile<L, LANE_MR, LANE_NR>(p_pack.data(), L, mr * L,
                                                                   q_pack.data() + i * L, h * L, L,
                                                                   eb + ((long)i * h + y) * L, L, h * L, kr,
                                                                   mr, std::min(LANE_NR, h - i), c0 > 0);
                            }
                        }
                    });
        // row: E[H + j, y, x] = sum_c Q[c, y, j] P[c, y, x], then the softmax (or its backward) per pixel
#pragma omp for collapse(2) schedule(dynamic, 2)
        for (int b = 0; b < batch; b++)
            for (int y = 0; y < h; y++) {
                pack_rows(p + b * bpq + y * w, hw, d, w, wp, p_rows.data());  // [c][x]
                pack_rows(q + b * bpq + y * w, hw, d, w, wp, q_rows.data());  // [c][j]
                float* eb = e + b * be;
                bcast_gemm(q_rows.data(), 1, wp, p_rows.data(), wp, map_rows(eb, h, w, h, y, ch), ch, w, d,
                           false);
                Rows pixel = map_rows(eb, h, w, 0, y, ch);
                for (int c = 0; c < ch.size(); c++)
                    with_lanes(ch.lanes[c], [&](auto lanes) {
                        constexpr int L = decltype(lanes)::value;
                        float* ep = pixel.start[c];
                        if (attn)
                            softmax_grad_lanes<L>(attn + (ep - e), ep, pixel.stride[c], h + w);
                        else
                            softmax_lanes<L>(ep, pixel.stride[c], h + w, y);
                    });
            }
    }
}

// out[b, c, y, x] = sum_i A[i, y, x] V[c, i, x] + sum_j A[H + j, y, x] V[c, y, j], A a chunked map
// (forward: A = attention, V = value; backward: A = grad of energies, V = key -> grad of query).
inline void aggregate(const float* a, const float* v, float* out, int batch, int d, int h, int w) {
    const long hw = (long)h * w, bv = d * hw, ba = (long)(h + w) * hw;
    const Chunks ch(w);
    const int c_block = channel_block(d), c_blocks = (d + c_block - 1) / c_block;
    const long wp = (w + 15) / 16 * 16, hp = (h + 15) / 16 * 16;
    const Chunks ch_y(h);
#pragma omp parallel
    {
        std::vector<float> v_pack((size_t)h * LANE_MR * VW), a_rows((size_t)w * wp),
            column((size_t)c_block * hp);
        // column: per lane, out[c, y] = sum_i V[c, i] A[i, y]
#pragma omp for collapse(2) schedule(dynamic)
        for (int b = 0; b < batch; b++)
            for (int cb = 0; cb < c_blocks; cb++)
                for (int c = 0; c < ch.size(); c++)
                    with_lanes(ch.lanes[c], [&](auto lanes) {
                        constexpr int L = decltype(lanes)::value;
                        const float* ab = a + b * ba + (h + w) * (long)h * ch.x0[c];
                        const int c1 = std::min(d, (cb + 1) * c_block), x = ch.x0[c];
                        if (L == 1) {  // one column: out[c, y] = sum_i V[c, i] A[i, y], vectorised over y
                            const float* vb = v + b * bv + (long)cb * c_block * hw + x;
                            bcast_gemm(vb, hw, w, ab, h, plain_rows(column.data(), hp, ch_y), ch_y,
                                       c1 - cb * c_block, h, false);
                            scatter_column(column.data(), hp, c1 - cb * c_block, h,
                                           out + b * bv + (long)cb * c_block * hw + x, hw, w);
                            return;
                        }
                        for (int c0 = cb * c_block; c0 < c1; c0 += LANE_MR) {
                            int mr = std::min(LANE_MR, c1 - c0);
                            pack<L>(v + b * bv + c0 * hw + ch.x0[c], w, hw, h, mr,
                                    v_pack.data());  // [i][c][lane]
                            for (int y = 0; y < h; y += LANE_NR)
                                lane_tile<L, LANE_MR, LANE_NR>(v_pack.data(), L, mr * L, ab + y * L, h * L, L,
                                                               out + b * bv + c0 * hw + y * w + ch.x0[c], hw,
                                                               w, h, mr, std::min(LANE_NR, h - y), false);
                        }
                    });
        // row: out[c, y, x] += sum_j V[c, y, j] A[H + j, y, x]
#pragma omp for collapse(2) schedule(dynamic, 2)
        for (int b = 0; b < batch; b++)
            for (int y = 0; y < h; y++) {
                pack_map_row_part(a + b * ba, h, w, y, ch, wp, false, a_rows.data());  // [j][x]
                bcast_gemm(v + b * bv + y * w, hw, 1, a_rows.data(), wp,
                           plain_rows(out + b * bv + y * w, hw, ch), ch, d, w, true);
            }
    }
}

// The transpose of aggregate: grad_v[b, c, i, x] = sum_y A[i, y, x] G[c, y, x] and
// grad_v[b, c, y, j] += sum_x A[H + j, y, x] G[c, y, x]
// (backward: A = attention, G = grad of out -> grad of value; A = grad of energies, G = query -> grad of
// key).
inline void aggregate_transposed(const float* a, const float* g, float* grad_v, int batch, int d, int h,
                                 int w) {
    const long hw = (long)h * w, bg = d * hw, ba = (long)(h + w) * hw;
    const Chunks ch(w);
    const int c_block = channel_block(d), c_blocks = (d + c_block - 1) / c_block;
    const long wp = (w + 15) / 16 * 16, hp = (h + 15) / 16 * 16;
    const Chunks ch_y(h);
#pragma omp parallel
    {
        std::vector<float> g_pack((size_t)h * LANE_MR * VW), a_t((size_t)w * wp),
            column((size_t)c_block * hp);
        std::vector<float> a_col_t((size_t)h * hp);
        // column: per lane, grad_v[c, i] = sum_y G[c, y] A[i, y]
#pragma omp for collapse(2) schedule(dynamic)
        for (int b = 0; b < batch; b++)
            for (int cb = 0; cb < c_blocks; cb++)
                for (int c = 0; c < ch.size(); c++)
                    with_lanes(ch.lanes[c], [&](auto lanes) {
                        constexpr int L = decltype(lanes)::value;
                        const float* ab = a + b * ba + (h + w) * (long)h * ch.x0[c];
                        const int c1 = std::min(d, (cb + 1) * c_block), x = ch.x0[c];
                        if (L == 1) {  // one column: grad_v[c, i] = sum_y G[c, y] A[i, y], vectorised over i
                            for (int i = 0; i < h; i++)
                                for (int y = 0; y < h; y++)
                                    a_col_t[y * hp + i] = ab[i * h + y];
                            const float* gb = g + b * bg + (long)cb * c_block * hw + x;
                            bcast_gemm(gb, hw, w, a_col_t.data(), hp, plain_rows(column.data(), hp, ch_y),
                                       ch_y, c1 - cb * c_block, h, false);
                            scatter_column(column.data(), hp, c1 - cb * c_block, h,
                                           grad_v + b * bg + (long)cb * c_block * hw + x, hw, w);
                            return;
                        }
                        for (int c0 = cb * c_block; c0 < c1; c0 += LANE_MR) {
                            int mr = std::min(LANE_MR, c1 - c0);
                            pack<L>(g + b * bg + c0 * hw + ch.x0[c], w, hw, h, mr,
                                    g_pack.data());  // [y][c][lane]
                            for (int i = 0; i < h; i += LANE_NR)
                                lane_tile<L, LANE_MR, LANE_NR>(g_pack.data(), L, mr * L, ab + (long)i * h * L,
                                                               L, h * L,
                                                               grad_v + b * bg + c0 * hw + i * w + ch.x0[c],
                                                               hw, w, h, mr, std::min(LANE_NR, h - i), false);
                        }
                    });
        // row: grad_v[c, y, j] += sum_x G[c, y, x] A_t[x, j] with A_t[x, j] = A[H + j, y, x]
#pragma omp for collapse(2) schedule(dynamic, 2)
        for (int b = 0; b < batch; b++)
            for (int y = 0; y < h; y++) {
                pack_map_row_part(a + b * ba, h, w, y, ch, wp, true, a_t.data());  // [x][j]
                bcast_gemm(g + b * bg + y * w, hw, 1, a_t.data(), wp,
                           plain_rows(grad_v + b * bg + y * w, hw, ch), ch, d, w, true);
            }
    }
}

}  // namespace cca_cpu
"""

# CUDA kernels: plain map layout, one thread per output element (see the comment below). Feature tensors (q, k, v
# and their grads) are float or __half (T); sums, the softmax and the attention map are float.
_CUDA_SOURCE = r"""
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
"""


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
        cpu_header=_CPU_SOURCE,
        cpu_src=cpu_call.replace("SIZES", sizes) + ";",
        cuda_header=_CUDA_SOURCE,
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
    return int(jt.code([1], "int32", [], cpu_header=_CPU_SOURCE, cpu_src="@out0(0) = cca_cpu::VW;").item())


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
        plain = criss_cross_attention(q, k, v)
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
    return passes_self_test(("cca", device, dtype), lambda: _self_test(dtype), what, "the plain ops")


def criss_cross_attention_fused(query: jt.Var, key: jt.Var, value: jt.Var) -> jt.Var:
    """(B, Cq, H, W), (B, Cq, H, W), (B, C, H, W) -> (B, C, H, W): `criss_cross_attention` in fused kernels.

    float32 kernels on the CPU and the GPU; float16 kernels on the GPU when all three inputs are float16 (sums and
    the softmax in float32 there). Other dtypes are computed in float32 and cast back to value's dtype."""
    _check_shapes(query, key, value)
    dtype = _kernel_dtype(query, key, value)
    if not fused_available(dtype):
        return criss_cross_attention(query, key, value)
    inputs = [x if x.dtype == dtype else x.cast(dtype) for x in (query, key, value)]
    out = CrissCrossAttentionFunction.apply(*inputs)
    return out if out.dtype == value.dtype else out.cast(value.dtype)


CCA_IMPLS["fused"] = criss_cross_attention_fused
