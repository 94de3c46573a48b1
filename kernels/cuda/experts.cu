// experts.cu - the routed experts (gathered rows, two grouped GEMMs, SwiGLU
// between them) and their weighted combine.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- grouped routed experts and their combine ------------------------------------
//
// experts: gather the rows of x (rounded to BF16 on the way: the GEMM input),
// one grouped gate/up GEMM [n, 2·Im] (f32), SwiGLU rounded to BF16, one
// grouped down GEMM into out.  Every output element is written by one
// thread or one GEMM tile: no atomics, deterministic.  With
// MOE_CUDA_PREC_F32, per expert FP32 GEMMs on f32 activations instead.

__global__ void k_gather_bf16(__nv_bfloat16 *dst, const float *src, const int32_t *rows, int n,
                              int C) {
    size_t tot = (size_t)n * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < tot;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        dst[i] = __float2bfloat16_rn(src[(size_t)rows[r] * C + c]);
    }
}

// h = silu(g)·u as k_swiglu (the CPU's formula), stored as BF16 or f32
template <typename T> __device__ inline T store_as(float v);
template <> __device__ inline float store_as<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 store_as<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <typename T> __global__ void k_swiglu_to(T *h, const float *gu, int R, int I) {
    size_t n = (size_t)R * I;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / I, c = i % I;
        float gv = gu[t * 2 * I + c], u = gu[t * 2 * I + I + c];
        float sg = 1.0f / (1.0f + expf(-gv));
        h[i] = store_as<T>((gv * sg) * u);
    }
}

void cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C);

void cu_experts(float *out, const float *x, const int32_t *rows, const int32_t *off,
                       const void *const *w_gu, const void *const *w_down, int E, int H, int Im) {
    LIVE();
    if (E <= 0 || H <= 0) return;
    int n = off[E] - off[0];
    if (n <= 0) return;
    // the experts that run; runs of consecutive ones share element-wise launches
    std::vector<const void *> wg(E, nullptr), wd(E, nullptr);
    std::vector<int> run0, run1; // row ranges [run0, run1) relative to off[0]
    for (int e = 0; e < E; e++) {
        int r0 = off[e] - off[0], r1 = off[e + 1] - off[0];
        if (!w_gu[e] || r1 <= r0) continue;
        wg[e] = w_gu[e];
        wd[e] = w_down[e];
        if (!run1.empty() && run1.back() == r0)
            run1.back() = r1;
        else
            run0.push_back(r0), run1.push_back(r1);
    }
    if (run0.empty()) return;
    if (Im <= 0) { // W_down · (empty) = 0
        for (size_t i = 0; i < run0.size(); i++)
            CK(cudaMemsetAsync(out + (size_t)run0[i] * H, 0,
                               sizeof(float) * (size_t)(run1[i] - run0[i]) * H, g.stream));
        return;
    }
    size_t I2 = 2 * (size_t)Im;
    float *gu = (float *)scratch_get(s_egu, sizeof(float) * (size_t)n * I2);
    if (g.failed) return;
    if (g.precision == MOE_CUDA_PREC_F32) {
        float *xg = (float *)scratch_get(s_exg, sizeof(float) * (size_t)n * H);
        float *h = (float *)scratch_get(s_eh, sizeof(float) * (size_t)n * Im);
        if (g.failed) return;
        cu_gather_rows(xg, x, rows, n, H);
        for (int e = 0; e < E; e++) {
            if (!wg[e]) continue;
            size_t r0 = (size_t)(off[e] - off[0]);
            cu_matmul(gu + r0 * I2, xg + r0 * H, wg[e], NULL, off[e + 1] - off[e], H, (int)I2, 0);
        }
        for (size_t i = 0; i < run0.size() && !g.failed; i++) {
            size_t cnt = (size_t)(run1[i] - run0[i]) * Im;
            k_swiglu_to<float><<<nblocks(cnt, 256), 256, 0, g.stream>>>(
                h + (size_t)run0[i] * Im, gu + (size_t)run0[i] * I2, run1[i] - run0[i], Im);
            CK_LAUNCH("k_swiglu_to<float>");
        }
        for (int e = 0; e < E; e++) {
            if (!wd[e]) continue;
            size_t r0 = (size_t)(off[e] - off[0]);
            cu_matmul(out + r0 * H, h + r0 * Im, wd[e], NULL, off[e + 1] - off[e], Im, H, 0);
        }
        return;
    }
    __nv_bfloat16 *xb = (__nv_bfloat16 *)scratch_get(s_exg, sizeof(__nv_bfloat16) * (size_t)n * H);
    __nv_bfloat16 *hb = (__nv_bfloat16 *)scratch_get(s_eh, sizeof(__nv_bfloat16) * (size_t)n * Im);
    if (g.failed) return;
    size_t tot = (size_t)n * H;
    k_gather_bf16<<<nblocks(tot, 256), 256, 0, g.stream>>>(xb, x, rows, n, H);
    CK_LAUNCH("k_gather_bf16");
    if (g.failed) return;
    grouped_bf16(gu, xb, wg.data(), off, E, H, (int)I2, 0.0f);
    for (size_t i = 0; i < run0.size() && !g.failed; i++) {
        size_t cnt = (size_t)(run1[i] - run0[i]) * Im;
        k_swiglu_to<__nv_bfloat16><<<nblocks(cnt, 256), 256, 0, g.stream>>>(
            hb + (size_t)run0[i] * Im, gu + (size_t)run0[i] * I2, run1[i] - run0[i], Im);
        CK_LAUNCH("k_swiglu_to<bf16>");
    }
    if (g.failed) return;
    grouped_bf16(out, hb, wd.data(), off, E, Im, H, 0.0f);
}

// y_t = Σ_k wt_tk · out_{slot_tk}: one thread per (t, c), k in order, the
// CPU's roundings (product rounded, then added to a sum started at 0)
__global__ void k_combine(float *y, const float *out, const int32_t *slot, const float *wt, int T,
                          int K, int H) {
    size_t n = (size_t)T * H;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / H, c = i % H;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            size_t s = (size_t)slot[t * K + k];
            acc = __fadd_rn(acc, __fmul_rn(out[s * H + c], wt[t * K + k]));
        }
        y[i] = acc;
    }
}

void cu_combine(float *y, const float *out, const int32_t *slot, const float *wt, int T,
                       int K, int H) {
    LIVE();
    size_t n = (size_t)(T > 0 ? T : 0) * (H > 0 ? H : 0);
    if (!n) return;
    k_combine<<<nblocks(n, 256), 256, 0, g.stream>>>(y, out, slot, wt, T, K < 0 ? 0 : K, H);
    CK_LAUNCH("k_combine");
}


// ---- backward of combine ----------------------------------------------------------------
//
// y_t = Σ_k wt_tk·out_{slot_tk}:
//   dout_{slot_tk} = wt_tk·dy_t (written; every row of out has one (t, k), so
//     one writer per element), one thread per element;
//   dwt_tk = <dy_t, out_{slot_tk}> (written), one block per (t, k), in double.
__global__ void k_combine_backward_dout(float *dout, const float *dy, const int32_t *slot,
                                        const float *wt, int T, int K, int H) {
    size_t n = (size_t)T * K * H;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t tk = i / H, c = i % H, t = tk / K;
        dout[(size_t)slot[tk] * H + c] = wt[tk] * dy[t * H + c];
    }
}
__global__ void k_combine_backward_dwt(float *dwt, const float *dy, const float *out,
                                       const int32_t *slot, int K, int H) {
    __shared__ double sh[33];
    size_t tk = blockIdx.x, t = tk / K;
    const float *o = out + (size_t)slot[tk] * H, *d = dy + t * H;
    double s = 0.0;
    for (int c = threadIdx.x; c < H; c += blockDim.x) s += (double)d[c] * o[c];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) dwt[tk] = (float)s;
}

void cu_combine_backward(float *dout, float *dwt, const float *dy, const float *out,
                         const int32_t *slot, const float *wt, int T, int K, int H) {
    LIVE();
    size_t n = (size_t)(T > 0 ? T : 0) * (K > 0 ? K : 0);
    if (!n || H <= 0) return;
    if (dout) {
        k_combine_backward_dout<<<nblocks(n * H, 256), 256, 0, g.stream>>>(dout, dy, slot, wt, T,
                                                                          K, H);
        CK_LAUNCH("k_combine_backward_dout");
    }
    if (dwt) { // T·K blocks: far below grid.x's 2^31 − 1
        k_combine_backward_dwt<<<(unsigned)n, ROW_THREADS, 0, g.stream>>>(dwt, dy, out, slot, K, H);
        CK_LAUNCH("k_combine_backward_dwt");
    }
}
