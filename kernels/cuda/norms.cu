// norms.cu - RMSNorm and rotary embedding.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- RMSNorm, RoPE ------------------------------------------------------------

__global__ void k_rmsnorm(float *y, const float *x, const float *w, float eps, int C) {
    __shared__ double sh[33];
    const float *xr = x + (size_t)blockIdx.x * C;
    float *yr = y + (size_t)blockIdx.x * C;
    double ss = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ss += (double)xr[c] * xr[c];
    ss = block_sum(ss, sh);
    float r = (float)(1.0 / sqrt(ss / C + (double)eps));
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = w[c] * (xr[c] * r); // y may alias x
}

void cu_rmsnorm(float *y, const float *x, const float *w, float eps, int T, int C) {
    LIVE();
    if (T <= 0 || C <= 0) return;
    // y may alias x: no __restrict__ anywhere, each element read and written by one thread
    for (int t0 = 0; t0 < T; t0 += 1 << 30) {
        int n = T - t0 < (1 << 30) ? T - t0 : (1 << 30);
        k_rmsnorm<<<n, ROW_THREADS, 0, g.stream>>>(y + (size_t)t0 * C, x + (size_t)t0 * C, w, eps, C);
        CK_LAUNCH("k_rmsnorm");
    }
}

// sgn = 1: rotation by +angle (the forward); −1: by −angle (its transpose, the
// backward).  −s is exact, so both directions round alike.
// y = w ⊙ x·r, r = (mean x² + eps)^(-1/2):
//   dx_c += r·w_c·dy_c − x_c·(r³/C)·Σ_j w_j·dy_j·x_j
// one block per row, sums in double; r_t goes to rs for the weight's
// gradient dw_c += Σ_t dy_tc·x_tc·r_t (a fixed-order column sum: colsum_add)
__global__ void k_rmsnorm_backward(float *dx, float *rs, const float *dy, const float *x,
                                   const float *w, float eps, int C) {
    __shared__ double sh[33];
    size_t row = (size_t)blockIdx.x * C;
    const float *xr = x + row, *dyr = dy + row;
    float *dxr = dx + row;
    double ss = 0.0, dot = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        ss += (double)xr[c] * xr[c];
        dot += (double)w[c] * dyr[c] * xr[c];
    }
    ss = block_sum(ss, sh);
    dot = block_sum(dot, sh);
    double r = 1.0 / sqrt(ss / C + (double)eps);
    float rf = (float)r, kf = (float)(r * r * r * dot / C);
    for (int c = threadIdx.x; c < C; c += blockDim.x) dxr[c] += rf * (w[c] * dyr[c]) - kf * xr[c];
    if (threadIdx.x == 0 && rs) rs[blockIdx.x] = rf;
}

scratch s_rowr;
void cu_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         float eps, int T, int C) {
    LIVE();
    if (T <= 0 || C <= 0) return;
    float *rs = NULL;
    if (dw) {
        rs = (float *)scratch_get(s_rowr, sizeof(float) * (size_t)T);
        if (g.failed) return;
    }
    for (int t0 = 0; t0 < T; t0 += 1 << 30) {
        int n = T - t0 < (1 << 30) ? T - t0 : (1 << 30);
        k_rmsnorm_backward<<<n, ROW_THREADS, 0, g.stream>>>(dx + (size_t)t0 * C, rs ? rs + t0 : NULL,
                                                            dy + (size_t)t0 * C, x + (size_t)t0 * C,
                                                            w, eps, C);
        CK_LAUNCH("k_rmsnorm_backward");
    }
    if (dw) colsum_add(dw, dy, x, rs, T, C);
}

__global__ void k_rope(float *x, const float *invf, int pos0, int T, int nh, int D, float sgn) {
    int half = D / 2;
    size_t n = (size_t)T * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i / half), j = (int)(i % half);
        float a = (float)(pos0 + t) * invf[j];
        float c = (float)cos((double)a), s = sgn * (float)sin((double)a);
        for (int h = 0; h < nh; h++) {
            float *v = x + ((size_t)t * nh + h) * D;
            float x0 = v[j], x1 = v[j + half];
            v[j] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
            v[j + half] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
        }
    }
}

// the inverse frequencies on the device, computed on the host exactly as the
// CPU op computes them; cached for the last (theta, D)
static const float *rope_invf(float theta, int D) {
    int half = D / 2;
    static float last_theta = -1.0f;
    static int last_D = -1;
    float *invf = (float *)s_rope.p;
    if (invf && theta == last_theta && D == last_D && s_rope.n >= sizeof(float) * half) return invf;
    std::vector<float> h(half);
    for (int j = 0; j < half; j++) {
        float e = (float)(2 * j) / (float)D;
        float p = (float)pow((double)theta, (double)e);
        h[j] = 1.0f / p;
    }
    invf = (float *)scratch_get(s_rope, sizeof(float) * half);
    if (g.failed) return NULL;
    if (!CK(cudaMemcpyAsync(invf, h.data(), sizeof(float) * half, cudaMemcpyHostToDevice,
                            g.stream)) ||
        !CK(cudaStreamSynchronize(g.stream))) // h is a local: wait for the copy
        return NULL;
    last_theta = theta;
    last_D = D;
    return invf;
}

static void rope_dir(float *x, float theta, int pos0, int T, int nh, int D, float sgn) {
    LIVE();
    int half = D / 2;
    if (T <= 0 || nh <= 0 || half <= 0) return;
    const float *invf = rope_invf(theta, D);
    if (!invf) return;
    size_t n = (size_t)T * half;
    k_rope<<<nblocks(n, 256), 256, 0, g.stream>>>(x, invf, pos0, T, nh, D, sgn);
    CK_LAUNCH("k_rope");
}

void cu_rope(float *x, float theta, int pos0, int T, int nh, int D) {
    rope_dir(x, theta, pos0, T, nh, D, 1.0f);
}

// rope is a rotation: its gradient is the rotation by −angle, in place
void cu_rope_backward(float *d, float theta, int pos0, int T, int nh, int D) {
    rope_dir(d, theta, pos0, T, nh, D, -1.0f);
}
