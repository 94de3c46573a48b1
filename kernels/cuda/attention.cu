// attention.cu - causal grouped-query attention, whole and over a KV cache.
// Part of the CUDA backend: see backend.cu and common.cuh.
#include "cuda/common.cuh"

// ---- attention ------------------------------------------------------------------
//
// One block per (tile of ATT_BQ queries, query head).  Key/value tiles of
// ATT_BK rows go through shared memory; the softmax is the online
// (running max / running sum) form, all fp32; each output element is owned
// by one thread and accumulated in key order, so results are deterministic.

#define ATT_BQ 16
#define ATT_BK 32 // == warp size: one lane per key in the softmax step
#define ATT_THREADS 128

static size_t att_smem_bytes(int D) {
    return sizeof(float) *
           ((size_t)ATT_BQ * D * 2 + (size_t)ATT_BK * (D + 1) + (size_t)ATT_BK * D + ATT_BQ * ATT_BK +
            3 * ATT_BQ);
}

__global__ void __launch_bounds__(ATT_THREADS)
    k_attention(float *out, const float *q, const float *k, const float *v, float scale, int P,
                int T, int nh, int nkv, int D) {
    // queries 0..T-1 sit at positions P..P+T-1; keys 0..P+T-1 (P cached ones first)
    extern __shared__ float sm[];
    const int KS = D + 1; // padded key rows: no bank conflicts in the score loop
    float *Qs = sm;                  // [BQ][D]
    float *Ks = Qs + ATT_BQ * D;     // [BK][D+1]
    float *Vs = Ks + ATT_BK * KS;    // [BK][D]
    float *Ss = Vs + ATT_BK * D;     // [BQ][BK]
    float *Os = Ss + ATT_BQ * ATT_BK; // [BQ][D]
    float *Ms = Os + ATT_BQ * D;     // [BQ] running max
    float *Ls = Ms + ATT_BQ;         // [BQ] running sum
    float *Cs = Ls + ATT_BQ;         // [BQ] rescale factor of this tile

    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int q0 = blockIdx.x * ATT_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t qs = (size_t)nh * D, ks = (size_t)nkv * D;

    for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
        int r = e / D, d = e % D, i = q0 + r;
        Qs[e] = i < T ? q[(size_t)i * qs + (size_t)h * D + d] : 0.0f;
        Os[e] = 0.0f;
    }
    if (tid < ATT_BQ) {
        Ms[tid] = -INFINITY;
        Ls[tid] = 0.0f;
        Cs[tid] = 1.0f;
    }
    const int qlast = min(q0 + ATT_BQ, T) - 1, NK = P + T;
    for (int k0 = 0; k0 <= P + qlast; k0 += ATT_BK) {
        __syncthreads(); // the previous tile is no longer read
        for (int e = tid; e < ATT_BK * D; e += ATT_THREADS) {
            int c = e / D, d = e % D, j = k0 + c;
            float kv = 0.0f, vv = 0.0f;
            if (j < NK) {
                kv = k[(size_t)j * ks + (size_t)kh * D + d];
                vv = v[(size_t)j * ks + (size_t)kh * D + d];
            }
            Ks[c * KS + d] = kv;
            Vs[c * D + d] = vv;
        }
        __syncthreads();
        for (int e = tid; e < ATT_BQ * ATT_BK; e += ATT_THREADS) {
            int r = e / ATT_BK, c = e % ATT_BK, i = q0 + r, j = k0 + c;
            float s = -INFINITY;
            if (i < T && j <= P + i) {
                const float *qr = Qs + r * D, *kr = Ks + c * KS;
                float acc = 0.0f;
                for (int d = 0; d < D; d++) acc += qr[d] * kr[d];
                s = acc * scale;
            }
            Ss[e] = s;
        }
        __syncthreads();
        for (int r = warp; r < ATT_BQ; r += ATT_THREADS / 32) {
            float s = Ss[r * ATT_BK + lane];
            float tmax = s;
            for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(FULL, tmax, o));
            float mold = Ms[r];
            float mnew = fmaxf(mold, tmax);
            float p = 0.0f, corr = 1.0f;
            if (mnew != -INFINITY) { // rows past T, or keys all masked so far: nothing to add
                p = expf(s - mnew);  // s = -inf gives 0
                corr = expf(mold - mnew);
            }
            float psum = p;
            for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(FULL, psum, o);
            Ss[r * ATT_BK + lane] = p;
            if (lane == 0) {
                Ms[r] = mnew;
                Ls[r] = Ls[r] * corr + psum;
                Cs[r] = corr;
            }
        }
        __syncthreads();
        for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
            int r = e / D, d = e % D;
            const float *pr = Ss + r * ATT_BK;
            float acc = Os[e] * Cs[r];
            for (int c = 0; c < ATT_BK; c++) acc += pr[c] * Vs[c * D + d];
            Os[e] = acc;
        }
    }
    __syncthreads();
    for (int e = tid; e < ATT_BQ * D; e += ATT_THREADS) {
        int r = e / D, d = e % D, i = q0 + r;
        if (i < T) out[(size_t)i * qs + (size_t)h * D + d] = Os[e] / Ls[r];
    }
}

void cu_attention_kv(float *out, const float *q, const float *k, const float *v,
                            float scale, int P, int T, int nh, int nkv, int D) {
    LIVE();
    if (T <= 0 || nh <= 0 || D <= 0 || P < 0) return;
    size_t smem = att_smem_bytes(D);
    if (smem > g.att_smem) {
        if (smem > g.smem_optin) {
            fail("attention: head_dim %d needs %zu bytes of shared memory per block, the device "
                 "allows %zu",
                 D, smem, g.smem_optin);
            return;
        }
        if (!CK(cudaFuncSetAttribute(k_attention, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)smem)))
            return;
        g.att_smem = smem;
    }
    dim3 grid((unsigned)((T + ATT_BQ - 1) / ATT_BQ), (unsigned)nh);
    k_attention<<<grid, ATT_THREADS, smem, g.stream>>>(out, q, k, v, scale, P, T, nh, nkv, D);
    CK_LAUNCH("k_attention");
}

void cu_attention(float *out, const float *q, const float *k, const float *v, float scale,
                         int T, int nh, int nkv, int D) {
    cu_attention_kv(out, q, k, v, scale, 0, T, nh, nkv, D);
}

