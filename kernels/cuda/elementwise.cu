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


// ---- backward -----------------------------------------------------------------------
//
// Element-wise: each gradient element has one writer; nothing is reduced
// across threads except sigmoid_gate_add's dz (one block per token, a fixed
// tree), so every result is the same bytes on every run.

// h = silu(g)·u, s = σ(g):  dg = dh·u·s·(1 + g·(1 − s)),  du = dh·g·s
__global__ void k_swiglu_backward(float *dgu, const float *dh, const float *gu, int T, int I) {
    size_t n = (size_t)T * I;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / I, c = i % I, gi = t * 2 * I + c, ui = gi + I;
        float gv = gu[gi], u = gu[ui], d = dh[i];
        float sg = 1.0f / (1.0f + expf(-gv));
        dgu[gi] += d * u * sg * (1.0f + gv * (1.0f - sg));
        dgu[ui] += d * gv * sg;
    }
}
void cu_swiglu_backward(float *dgu, const float *dh, const float *gu, int T, int I) {
    LIVE();
    size_t n = (size_t)T * (I > 0 ? I : 0);
    if (!n) return;
    k_swiglu_backward<<<nblocks(n, 256), 256, 0, g.stream>>>(dgu, dh, gu, T, I);
    CK_LAUNCH("k_swiglu_backward");
}

// y_t += σ(z_t)·x_t:  dx_t += σ(z_t)·dy_t;  dz_t += σ(z_t)(1 − σ(z_t))·<dy_t, x_t>
// one block per token (the dot product in double)
__global__ void k_sigmoid_gate_add_backward(float *dx, float *dz, const float *dy, const float *x,
                                            const float *z, int C) {
    __shared__ double sh[33];
    size_t row = (size_t)blockIdx.x * C;
    float gt = 1.0f / (1.0f + expf(-z[blockIdx.x]));
    double dot = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        if (dx) dx[row + c] += gt * dy[row + c];
        if (dz) dot += (double)dy[row + c] * x[row + c];
    }
    if (!dz) return; // uniform across the block: no thread waits at a barrier alone
    dot = block_sum(dot, sh);
    if (threadIdx.x == 0) dz[blockIdx.x] += (float)((double)gt * (1.0 - (double)gt) * dot);
}
void cu_sigmoid_gate_add_backward(float *dx, float *dz, const float *dy, const float *x,
                                  const float *z, int T, int C) {
    LIVE();
    if (T <= 0 || C <= 0 || (!dx && !dz)) return;
    for (int t0 = 0; t0 < T; t0 += 1 << 30) {
        int n = T - t0 < (1 << 30) ? T - t0 : (1 << 30);
        size_t o = (size_t)t0 * C;
        k_sigmoid_gate_add_backward<<<n, ROW_THREADS, 0, g.stream>>>(
            dx ? dx + o : NULL, dz ? dz + t0 : NULL, dy + o, x + o, z + t0, C);
        CK_LAUNCH("k_sigmoid_gate_add_backward");
    }
}

// ---- optimiser -------------------------------------------------------------------------
//
// PyTorch's AdamW (torch.optim.AdamW, single-tensor path), element by element:
//   p *= 1 − lr·wd;  m = lerp(m, g, 1 − β1);  v = β2·v + (1 − β2)·g²;
//   p −= (lr / (1 − β1^step)) · m / (sqrt(v) / sqrt(1 − β2^step) + eps)
// with g = gscale·grad.  The step's scalars are computed on the host in double.
__global__ void k_adamw(float *p, float *m, float *v, const float *gr, size_t n, float decay,
                        float b1c, float beta2, float b2c, float step_size, float bc2_sqrt,
                        float eps, float gscale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gv = gr[i] * gscale;
        float pv = p[i] * decay;
        float mv = m[i];
        mv = mv + b1c * (gv - mv); // torch.lerp with weight 1 − β1 < 0.5
        float vv = v[i] * beta2 + b2c * (gv * gv);
        float den = sqrtf(vv) / bc2_sqrt + eps;
        p[i] = pv - step_size * (mv / den);
        m[i] = mv;
        v[i] = vv;
    }
}
void cu_adamw(float *p, float *m, float *v, const float *gr, size_t n, float lr, float beta1,
              float beta2, float eps, float weight_decay, float gscale, int step) {
    LIVE();
    if (!n) return;
    if (step < 1) step = 1;
    double bc1 = 1.0 - pow((double)beta1, step), bc2 = 1.0 - pow((double)beta2, step);
    float decay = (float)(1.0 - (double)lr * weight_decay);
    float step_size = (float)((double)lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    float b1c = (float)(1.0 - (double)beta1), b2c = (float)(1.0 - (double)beta2);
    k_adamw<<<nblocks(n, 256), 256, 0, g.stream>>>(p, m, v, gr, n, decay, b1c, beta2, b2c,
                                                   step_size, bc2_sqrt, eps, gscale);
    CK_LAUNCH("k_adamw");
}
