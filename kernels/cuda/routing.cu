// routing.cu - top-k routing and row gather / scatter-add.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- routing and dispatch -----------------------------------------------------------

// the CPU's softmax_row: float exps, double sum, one float reciprocal
__device__ void d_softmax_row(float *p, const float *x, int C) {
    float mx = -INFINITY;
    for (int c = 0; c < C; c++) mx = fmaxf(mx, x[c]);
    double sum = 0.0;
    for (int c = 0; c < C; c++) {
        p[c] = expf(x[c] - mx);
        sum += p[c];
    }
    float inv = (float)(1.0 / sum);
    for (int c = 0; c < C; c++) p[c] *= inv;
}

// the CPU's topk_row: ties to the lower index, sorted descending
__device__ void d_topk_row(int32_t *idx, float *val, const float *s, int E, int K) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int j = 0; j < k; j++)
                if (idx[j] == e) taken = true;
            if (taken) continue;
            if (best < 0 || s[e] > s[best]) best = e;
        }
        idx[k] = best;
        val[k] = s[best];
    }
}

__global__ void k_router(int32_t *idx, float *wt, float *probs, float *scratch,
                         const float *logits, int mode, int renorm, int T, int E, int K) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *l = logits + (size_t)t * E;
    int32_t *ix = idx + (size_t)t * K;
    float *w = wt + (size_t)t * K;
    if (mode == MOE_ROUTE_TOPK_SOFTMAX) {
        d_topk_row(ix, w, l, E, K);
        d_softmax_row(w, w, K);
        if (probs) d_softmax_row(probs + (size_t)t * E, l, E);
    } else {
        float *p = probs ? probs + (size_t)t * E : scratch + (size_t)t * E;
        d_softmax_row(p, l, E);
        d_topk_row(ix, w, p, E, K);
    }
    if (renorm != MOE_RENORM_NONE) {
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += w[k];
        if (renorm == MOE_RENORM_SUM_EPS) s += 1e-20f;
        for (int k = 0; k < K; k++) w[k] /= s;
    }
}

void cu_router(int32_t *idx, float *wt, float *probs, const float *logits, int mode,
                      int renorm, int T, int E, int K) {
    LIVE();
    if (T <= 0 || E <= 0 || K <= 0) return;
    float *scratch = NULL;
    if (mode != MOE_ROUTE_TOPK_SOFTMAX && !probs) {
        scratch = (float *)scratch_get(s_probs, sizeof(float) * (size_t)T * E);
        if (g.failed) return;
    }
    k_router<<<(T + 127) / 128, 128, 0, g.stream>>>(idx, wt, probs, scratch, logits, mode, renorm,
                                                     T, E, K);
    CK_LAUNCH("k_router");
}

__global__ void k_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C) {
    size_t tot = (size_t)n * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < tot;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        dst[i] = src[(size_t)rows[r] * C + c];
    }
}
void cu_gather_rows(float *dst, const float *src, const int32_t *rows, int n, int C) {
    LIVE();
    size_t tot = (size_t)(n > 0 ? n : 0) * (C > 0 ? C : 0);
    if (!tot) return;
    k_gather_rows<<<nblocks(tot, 256), 256, 0, g.stream>>>(dst, src, rows, n, C);
    CK_LAUNCH("k_gather_rows");
}

// rows are distinct within one call (kernels.h), so every destination
// element has exactly one writer: no atomics, same result as the CPU's loop
__global__ void k_scatter_add_rows(float *dst, const float *src, const int32_t *rows,
                                   const float *scale, int n, int C) {
    size_t tot = (size_t)n * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < tot;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        float *d = dst + (size_t)rows[r] * C + c;
        *d = scale ? __fadd_rn(*d, __fmul_rn(src[i], scale[r])) : __fadd_rn(*d, src[i]);
    }
}
void cu_scatter_add_rows(float *dst, const float *src, const int32_t *rows,
                                const float *scale, int n, int C) {
    LIVE();
    size_t tot = (size_t)(n > 0 ? n : 0) * (C > 0 ? C : 0);
    if (!tot) return;
    k_scatter_add_rows<<<nblocks(tot, 256), 256, 0, g.stream>>>(dst, src, rows, scale, n, C);
    CK_LAUNCH("k_scatter_add_rows");
}


// ---- backward -----------------------------------------------------------------------

// d loss / d (top-k weight before renormalisation) of slot k: wt_k = w_k / S,
// S = Σ_j w_j (+ 1e-20), so dw_k = (dwt_k − Σ_j dwt_j·wt_j) / S; without
// renormalisation dw_k = dwt_k.  w_k = probs[idx_k] in both modes
// (TOPK_SOFTMAX = SOFTMAX_TOPK + RENORM_SUM).
__device__ inline float d_topk_dw(int k, const float *dwt, float dotw, float S, bool renorm) {
    return renorm ? (dwt[k] - dotw) / S : dwt[k];
}

// one thread per token: dp_e = dprobs_e + Σ_{k: idx_k = e} dw_k, then the
// softmax's gradient dlogits_e = p_e·(dp_e − Σ_j p_j·dp_j) (the sum in double)
__global__ void k_router_backward(float *dlogits, const float *dwt, const float *dprobs,
                                  const int32_t *idx, const float *wt, const float *probs, int mode,
                                  int renorm, int T, int E, int K) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float *p = probs + (size_t)t * E, *dw = dwt + (size_t)t * K, *w = wt + (size_t)t * K;
    const float *dpr = dprobs ? dprobs + (size_t)t * E : NULL;
    const int32_t *ix = idx + (size_t)t * K;
    float *dl = dlogits + (size_t)t * E;
    bool ren = mode == MOE_ROUTE_TOPK_SOFTMAX || renorm != MOE_RENORM_NONE;
    float S = 0.0f, dotw = 0.0f;
    for (int k = 0; k < K; k++) {
        S += p[ix[k]];
        dotw += dw[k] * w[k];
    }
    if (mode != MOE_ROUTE_TOPK_SOFTMAX && renorm == MOE_RENORM_SUM_EPS) S += 1e-20f;
    double dot = 0.0;
    for (int pass = 0; pass < 2; pass++) {
        float dotf = (float)dot;
        for (int e = 0; e < E; e++) {
            float dp = dpr ? dpr[e] : 0.0f;
            for (int k = 0; k < K; k++)
                if (ix[k] == e) dp += d_topk_dw(k, dw, dotw, S, ren);
            if (pass == 0)
                dot += (double)p[e] * dp;
            else
                dl[e] = p[e] * (dp - dotf);
        }
    }
}

void cu_router_backward(float *dlogits, const float *dwt, const float *dprobs, const int32_t *idx,
                        const float *wt, const float *probs, int mode, int renorm, int T, int E,
                        int K) {
    LIVE();
    if (T <= 0 || E <= 0) return;
    k_router_backward<<<(T + 127) / 128, 128, 0, g.stream>>>(dlogits, dwt, dprobs, idx, wt, probs,
                                                              mode, renorm, T, E, K < 0 ? 0 : K);
    CK_LAUNCH("k_router_backward");
}

// dE[ids_t] += dx_t: one thread per channel walks the tokens in order, so a
// row that several tokens share gets their gradients in token order (no
// atomics, the same bytes as the CPU's loop).  Latency-bound over T, but it
// runs once per step, and only when the embedding is trained.
__global__ void k_embed_backward(float *dE, const float *dx, const int32_t *ids, int T, int H) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H) return;
    for (int t = 0; t < T; t++) {
        float *d = dE + (size_t)ids[t] * H + c;
        *d = __fadd_rn(*d, dx[(size_t)t * H + c]);
    }
}
void cu_embed_backward(float *dE, const float *dx, const int32_t *ids, int T, int H) {
    LIVE();
    if (T <= 0 || H <= 0) return;
    k_embed_backward<<<(H + 127) / 128, 128, 0, g.stream>>>(dE, dx, ids, T, H);
    CK_LAUNCH("k_embed_backward");
}
