// ReLU forward and backward on all threads (CPU, OpenMP); compiled by jt.code (ccnet/ops/relu.py).

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
