// Per-channel sums for batch norm in one float64 pass (CPU, OpenMP); compiled by jt.code (ccnet/ops/batch_norm.py).

namespace bn_cpu {
// sa[c] = sum of a[n, c, i], sab[c] = sum of a[n, c, i] * b[n, c, i], over n < batch and i < inner.
inline void channel_sums(const float* a, const float* b, double* sa, double* sab, long batch, long channels,
                         long inner) {
#pragma omp parallel for schedule(dynamic, 1)
    for (long c = 0; c < channels; c++) {
        double s = 0, sp = 0;
        for (long n = 0; n < batch; n++) {
            const float* pa = a + (n * channels + c) * inner;
            const float* pb = b + (n * channels + c) * inner;
#pragma omp simd reduction(+ : s, sp)
            for (long i = 0; i < inner; i++) {  // float64 accumulators: E[x^2] - E[x]^2 cancels
                s += pa[i];
                sp += (double)pa[i] * pb[i];
            }
        }
        sa[c] = s;
        sab[c] = sp;
    }
}
}  // namespace bn_cpu
