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


// ---- backward ---------------------------------------------------------------------------------
//
// FlashAttention-2's backward without its atomics, in three passes that each
// recompute the scores of a (query tile, key tile) pair from q and k in
// shared memory (nothing of size T² is ever stored):
//   1. k_att_stats, one block per (query tile, head): each query row's
//      softmax max M and sum L (online, as the forward) and
//      Dr = Σ_d dout·out (= Σ_j P_j·dP_j);
//   2. k_att_dq, one block per (query tile, head), key tiles in order:
//      P = exp(S − M)/L, dP = dout·vᵀ, dS = P·(dP − Dr), dq += scale·dS·k;
//   3. k_att_dkv, one block per (key tile, KV head), its query heads and
//      query tiles in order: dv += Pᵀ·dout, dk += scale·dSᵀ·q.
// Every gradient element is owned by one thread of one block and summed in
// a fixed order: deterministic, no atomics.  The stats are [nh, T] floats.

static bool att_smem_allow(const void *fn, size_t smem, size_t *allowed, const char *what, int D) {
    if (smem <= *allowed) return true;
    if (smem > g.smem_optin) {
        fail("%s: head_dim %d needs %zu bytes of shared memory per block, the device allows %zu",
             what, D, smem, g.smem_optin);
        return false;
    }
    if (!CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)))
        return false;
    *allowed = smem;
    return true;
}

// score of query row r (Qs) and key row c (Ks, padded rows), or −inf when masked
static __device__ inline float att_score(const float *Qs, const float *Ks, int r, int c, int i,
                                         int j, int T, int D, float scale) {
    if (i >= T || j > i) return -INFINITY;
    const float *qr = Qs + r * D, *kr = Ks + c * (D + 1);
    float acc = 0.0f;
    for (int d = 0; d < D; d++) acc += qr[d] * kr[d];
    return acc * scale;
}

// rows r of a [BQ][D] tile from a [T, n·D] matrix (head h), zeros past T
static __device__ inline void att_load_rows(float *dst, const float *src, int r0, int T, int n, int h,
                                            int D, int rows) {
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        int r = e / D, d = e % D, i = r0 + r;
        dst[e] = i < T ? src[(size_t)i * n * D + (size_t)h * D + d] : 0.0f;
    }
}
// the same into padded rows of D + 1
static __device__ inline void att_load_rows_padded(float *dst, const float *src, int r0, int T,
                                                   int n, int h, int D, int rows) {
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        int r = e / D, d = e % D, i = r0 + r;
        dst[r * (D + 1) + d] = i < T ? src[(size_t)i * n * D + (size_t)h * D + d] : 0.0f;
    }
}

static size_t att_stats_smem(int D) {
    return sizeof(float) * ((size_t)ATT_BQ * D + (size_t)ATT_BK * (D + 1) + ATT_BQ * ATT_BK);
}
__global__ void __launch_bounds__(ATT_THREADS)
    k_att_stats(float *Mo, float *Lo, float *Do, const float *q, const float *k, const float *out,
                const float *dout, float scale, int T, int nh, int nkv, int D) {
    extern __shared__ float sm[];
    float *Qs = sm;                  // [BQ][D]
    float *Ks = Qs + ATT_BQ * D;     // [BK][D+1]
    float *Ss = Ks + ATT_BK * (D + 1); // [BQ][BK]
    const int h = blockIdx.y, kh = h / (nh / nkv), q0 = blockIdx.x * ATT_BQ;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    att_load_rows(Qs, q, q0, T, nh, h, D, ATT_BQ);
    const int qlast = min(q0 + ATT_BQ, T) - 1;
    // each warp owns rows warp, warp + 4, ...: their running (m, l) in registers,
    // the same in every lane
    float mr[ATT_BQ / (ATT_THREADS / 32)], lr[ATT_BQ / (ATT_THREADS / 32)];
    for (int u = 0; u < ATT_BQ / (ATT_THREADS / 32); u++) mr[u] = -INFINITY, lr[u] = 0.0f;
    for (int k0 = 0; k0 <= qlast; k0 += ATT_BK) {
        __syncthreads(); // the previous tile is no longer read
        att_load_rows_padded(Ks, k, k0, T, nkv, kh, D, ATT_BK);
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_BQ * ATT_BK; e += ATT_THREADS) {
            int r = e / ATT_BK, c = e % ATT_BK;
            Ss[e] = att_score(Qs, Ks, r, c, q0 + r, k0 + c, T, D, scale);
        }
        __syncthreads();
        for (int u = 0, r = warp; r < ATT_BQ; r += ATT_THREADS / 32, u++) {
            float s = Ss[r * ATT_BK + lane], tmax = s;
            for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(FULL, tmax, o));
            float mnew = fmaxf(mr[u], tmax), p = 0.0f, corr = 1.0f;
            if (mnew != -INFINITY) {
                p = expf(s - mnew);
                corr = expf(mr[u] - mnew);
            }
            for (int o = 16; o > 0; o >>= 1) p += __shfl_xor_sync(FULL, p, o);
            mr[u] = mnew;
            lr[u] = lr[u] * corr + p;
        }
    }
    const size_t qs = (size_t)nh * D;
    float dsum[ATT_BQ / (ATT_THREADS / 32)];
    for (int u = 0, r = warp; r < ATT_BQ; r += ATT_THREADS / 32, u++) {
        int i = q0 + r;
        float a = 0.0f;
        if (i < T)
            for (int d = lane; d < D; d += 32)
                a += dout[(size_t)i * qs + (size_t)h * D + d] * out[(size_t)i * qs + (size_t)h * D + d];
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(FULL, a, o);
        dsum[u] = a;
    }
    __syncthreads(); // every lane is past its last shuffle before any exits (the emulator checks)
    if (lane != 0) return;
    for (int u = 0, r = warp; r < ATT_BQ; r += ATT_THREADS / 32, u++) {
        int i = q0 + r;
        if (i >= T) break;
        Mo[(size_t)h * T + i] = mr[u];
        Lo[(size_t)h * T + i] = lr[u];
        Do[(size_t)h * T + i] = dsum[u];
    }
}

// P and dS of query row r, key c: P = exp(S − M)/L, dS = P·(dP − Dr), dP = dout_r·v_c
static __device__ inline void att_p_ds(float *p, float *ds, const float *Qs, const float *dOs,
                                       const float *Ks, const float *Vs, const float *Ms,
                                       const float *Ls, const float *Dr, int r, int c, int i, int j,
                                       int T, int D, float scale) {
    float s = att_score(Qs, Ks, r, c, i, j, T, D, scale);
    if (s == -INFINITY) {
        *p = *ds = 0.0f;
        return;
    }
    float pv = expf(s - Ms[r]) / Ls[r];
    const float *gr = dOs + r * D, *vr = Vs + c * (D + 1);
    float dp = 0.0f;
    for (int d = 0; d < D; d++) dp += gr[d] * vr[d];
    *p = pv;
    *ds = pv * (dp - Dr[r]);
}

// the BQ rows' stats of head h into shared memory
static __device__ inline void att_load_stats(float *Ms, float *Ls, float *Dr, const float *M,
                                             const float *L, const float *Dd, int q0, int T, int h) {
    for (int r = threadIdx.x; r < ATT_BQ; r += blockDim.x) {
        int i = q0 + r;
        bool in = i < T;
        Ms[r] = in ? M[(size_t)h * T + i] : 0.0f;
        Ls[r] = in ? L[(size_t)h * T + i] : 1.0f;
        Dr[r] = in ? Dd[(size_t)h * T + i] : 0.0f;
    }
}

static size_t att_dq_smem(int D) {
    return sizeof(float) * ((size_t)3 * ATT_BQ * D + (size_t)2 * ATT_BK * (D + 1) +
                            ATT_BQ * ATT_BK + 3 * ATT_BQ);
}
__global__ void __launch_bounds__(ATT_THREADS)
    k_att_dq(float *dq, const float *q, const float *k, const float *v, const float *dout,
             const float *M, const float *L, const float *Dd, float scale, int T, int nh, int nkv,
             int D) {
    extern __shared__ float sm[];
    float *Qs = sm;                       // [BQ][D]
    float *dOs = Qs + ATT_BQ * D;         // [BQ][D]
    float *Acc = dOs + ATT_BQ * D;        // [BQ][D] Σ_c dS·k
    float *Ks = Acc + ATT_BQ * D;         // [BK][D+1]
    float *Vs = Ks + ATT_BK * (D + 1);    // [BK][D+1]
    float *dSs = Vs + ATT_BK * (D + 1);   // [BQ][BK]
    float *Ms = dSs + ATT_BQ * ATT_BK, *Ls = Ms + ATT_BQ, *Dr = Ls + ATT_BQ;
    const int h = blockIdx.y, kh = h / (nh / nkv), q0 = blockIdx.x * ATT_BQ;
    att_load_rows(Qs, q, q0, T, nh, h, D, ATT_BQ);
    att_load_rows(dOs, dout, q0, T, nh, h, D, ATT_BQ);
    for (int e = threadIdx.x; e < ATT_BQ * D; e += ATT_THREADS) Acc[e] = 0.0f;
    att_load_stats(Ms, Ls, Dr, M, L, Dd, q0, T, h);
    const int qlast = min(q0 + ATT_BQ, T) - 1;
    for (int k0 = 0; k0 <= qlast; k0 += ATT_BK) {
        __syncthreads();
        att_load_rows_padded(Ks, k, k0, T, nkv, kh, D, ATT_BK);
        att_load_rows_padded(Vs, v, k0, T, nkv, kh, D, ATT_BK);
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_BQ * ATT_BK; e += ATT_THREADS) {
            int r = e / ATT_BK, c = e % ATT_BK;
            float p;
            att_p_ds(&p, &dSs[e], Qs, dOs, Ks, Vs, Ms, Ls, Dr, r, c, q0 + r, k0 + c, T, D, scale);
        }
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_BQ * D; e += ATT_THREADS) {
            int r = e / D, d = e % D;
            const float *dsr = dSs + r * ATT_BK;
            float acc = Acc[e];
            for (int c = 0; c < ATT_BK; c++) acc += dsr[c] * Ks[c * (D + 1) + d];
            Acc[e] = acc;
        }
    }
    __syncthreads();
    const size_t qs = (size_t)nh * D;
    for (int e = threadIdx.x; e < ATT_BQ * D; e += ATT_THREADS) {
        int r = e / D, d = e % D, i = q0 + r;
        if (i < T) dq[(size_t)i * qs + (size_t)h * D + d] += scale * Acc[e];
    }
}

static size_t att_dkv_smem(int D) {
    return sizeof(float) * ((size_t)2 * ATT_BK * (D + 1) + (size_t)2 * ATT_BQ * D +
                            (size_t)2 * ATT_BK * D + 2 * ATT_BQ * ATT_BK + 3 * ATT_BQ);
}
__global__ void __launch_bounds__(ATT_THREADS)
    k_att_dkv(float *dk, float *dv, const float *q, const float *k, const float *v,
              const float *dout, const float *M, const float *L, const float *Dd, float scale,
              int T, int nh, int nkv, int D) {
    extern __shared__ float sm[];
    float *Ks = sm;                       // [BK][D+1]
    float *Vs = Ks + ATT_BK * (D + 1);    // [BK][D+1]
    float *dKa = Vs + ATT_BK * (D + 1);   // [BK][D] Σ dS·q
    float *dVa = dKa + ATT_BK * D;        // [BK][D] Σ P·dout
    float *Qs = dVa + ATT_BK * D;         // [BQ][D]
    float *dOs = Qs + ATT_BQ * D;         // [BQ][D]
    float *Ps = dOs + ATT_BQ * D;         // [BQ][BK]
    float *dSs = Ps + ATT_BQ * ATT_BK;    // [BQ][BK]
    float *Ms = dSs + ATT_BQ * ATT_BK, *Ls = Ms + ATT_BQ, *Dr = Ls + ATT_BQ;
    const int kh = blockIdx.y, group = nh / nkv, k0 = blockIdx.x * ATT_BK;
    att_load_rows_padded(Ks, k, k0, T, nkv, kh, D, ATT_BK);
    att_load_rows_padded(Vs, v, k0, T, nkv, kh, D, ATT_BK);
    for (int e = threadIdx.x; e < ATT_BK * D; e += ATT_THREADS) dKa[e] = dVa[e] = 0.0f;
    for (int h = kh * group; h < (kh + 1) * group; h++) {
        for (int q0 = k0 / ATT_BQ * ATT_BQ; q0 < T; q0 += ATT_BQ) { // queries before k0 see none
            __syncthreads(); // the previous query tile is no longer read
            att_load_rows(Qs, q, q0, T, nh, h, D, ATT_BQ);
            att_load_rows(dOs, dout, q0, T, nh, h, D, ATT_BQ);
            att_load_stats(Ms, Ls, Dr, M, L, Dd, q0, T, h);
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_BQ * ATT_BK; e += ATT_THREADS) {
                int r = e / ATT_BK, c = e % ATT_BK;
                att_p_ds(&Ps[e], &dSs[e], Qs, dOs, Ks, Vs, Ms, Ls, Dr, r, c, q0 + r, k0 + c, T, D,
                         scale);
            }
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_BK * D; e += ATT_THREADS) {
                int c = e / D, d = e % D;
                float ak = dKa[e], av = dVa[e];
                for (int r = 0; r < ATT_BQ; r++) {
                    ak += dSs[r * ATT_BK + c] * Qs[r * D + d];
                    av += Ps[r * ATT_BK + c] * dOs[r * D + d];
                }
                dKa[e] = ak;
                dVa[e] = av;
            }
        }
    }
    __syncthreads();
    const size_t ks = (size_t)nkv * D;
    for (int e = threadIdx.x; e < ATT_BK * D; e += ATT_THREADS) {
        int c = e / D, d = e % D, j = k0 + c;
        if (j >= T) continue;
        size_t o = (size_t)j * ks + (size_t)kh * D + d;
        dk[o] += scale * dKa[e];
        dv[o] += dVa[e];
    }
}

scratch s_att; // M, L, Dr: 3 x [nh, T]
static size_t att_stats_allowed = 48 * 1024, att_dq_allowed = 48 * 1024, att_dkv_allowed = 48 * 1024;

void cu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                           const float *k, const float *v, const float *out, float scale, int T,
                           int nh, int nkv, int D) {
    LIVE();
    if (T <= 0 || nh <= 0 || nkv <= 0 || D <= 0) return;
    if (!att_smem_allow((const void *)k_att_stats, att_stats_smem(D), &att_stats_allowed,
                        "attention_backward", D) ||
        !att_smem_allow((const void *)k_att_dq, att_dq_smem(D), &att_dq_allowed,
                        "attention_backward", D) ||
        !att_smem_allow((const void *)k_att_dkv, att_dkv_smem(D), &att_dkv_allowed,
                        "attention_backward", D))
        return;
    size_t ns = (size_t)nh * T;
    float *M = (float *)scratch_get(s_att, sizeof(float) * 3 * ns);
    if (g.failed) return;
    float *L = M + ns, *Dd = L + ns;
    dim3 gq((unsigned)((T + ATT_BQ - 1) / ATT_BQ), (unsigned)nh);
    k_att_stats<<<gq, ATT_THREADS, att_stats_smem(D), g.stream>>>(M, L, Dd, q, k, out, dout, scale,
                                                                 T, nh, nkv, D);
    CK_LAUNCH("k_att_stats");
    k_att_dq<<<gq, ATT_THREADS, att_dq_smem(D), g.stream>>>(dq, q, k, v, dout, M, L, Dd, scale, T,
                                                           nh, nkv, D);
    CK_LAUNCH("k_att_dq");
    dim3 gk((unsigned)((T + ATT_BK - 1) / ATT_BK), (unsigned)nkv);
    k_att_dkv<<<gk, ATT_THREADS, att_dkv_smem(D), g.stream>>>(dk, dv, q, k, v, dout, M, L, Dd,
                                                             scale, T, nh, nkv, D);
    CK_LAUNCH("k_att_dkv");
}
