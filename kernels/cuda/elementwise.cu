// elementwise.cu - SwiGLU, axpy and the sigmoid-gated add of the shared expert.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- element-wise -----------------------------------------------------------------

__global__ void k_swiglu(float *h, const float *gu, int T, int I) {
    size_t n = (size_t)T * I;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / I, c = i % I;
        float gv = gu[t * 2 * I + c], u = gu[t * 2 * I + I + c];
        float sg = 1.0f / (1.0f + expf(-gv));
        h[i] = (gv * sg) * u;
    }
}
void cu_swiglu(float *h, const float *gu, int T, int I) {
    LIVE();
    size_t n = (size_t)T * (I > 0 ? I : 0);
    if (!n) return;
    k_swiglu<<<nblocks(n, 256), 256, 0, g.stream>>>(h, gu, T, I);
    CK_LAUNCH("k_swiglu");
}

__global__ void k_axpy(float *y, const float *x, float a, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(y[i], __fmul_rn(a, x[i]));
}
void cu_axpy(float *y, const float *x, float a, size_t n) {
    LIVE();
    if (!n) return;
    k_axpy<<<nblocks(n, 256), 256, 0, g.stream>>>(y, x, a, n);
    CK_LAUNCH("k_axpy");
}

__global__ void k_sigmoid_gate_add(float *y, const float *x, const float *z, int T, int C) {
    size_t n = (size_t)T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gt = 1.0f / (1.0f + expf(-z[i / C]));
        y[i] = __fadd_rn(y[i], __fmul_rn(gt, x[i]));
    }
}
void cu_sigmoid_gate_add(float *y, const float *x, const float *z, int T, int C) {
    LIVE();
    size_t n = (size_t)T * (C > 0 ? C : 0);
    if (!n) return;
    k_sigmoid_gate_add<<<nblocks(n, 256), 256, 0, g.stream>>>(y, x, z, T, C);
    CK_LAUNCH("k_sigmoid_gate_add");
}

